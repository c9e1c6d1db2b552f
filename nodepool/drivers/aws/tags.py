"""The tags we put on instances, volumes, snapshots, AMIs and S3 objects (pure functions).

AWS tags are string pairs: keys at most 128 characters, values at most 256.  Our metadata keys
(``nodepool_node_id``, ``nodepool_provider_name``...) come last so a label's ``tags`` can never
hide them.
"""
import logging
from urllib.parse import urlencode

from ..base import request_namespace

MAX_KEY = 128
MAX_VALUE = 256

log = logging.getLogger("nodepool.drivers.aws")




def clean(tags):
    """Tags as strings cut to AWS's lengths."""
    return {str(k)[:MAX_KEY]: ("" if v is None else str(v))[:MAX_VALUE]
            for k, v in tags.items()}


def instance_tags(hostname, label_name, label_options, metadata, request=None):
    """Tags of a new instance: label ``tags``, formatted ``dynamic-tags``, ``Name``, ours.

    A ``dynamic-tags`` template that cannot be formatted is skipped with a warning: a typo in
    a tag must not fail launches."""
    tags = dict(label_options.get("tags") or {})
    ns = request_namespace(request)
    for key, template in (label_options.get("dynamic-tags") or {}).items():
        try:
            tags[key] = str(template).format(request=ns)
        except Exception as exc:
            log.warning("label %s: dynamic-tag %s: cannot format %r: %s", label_name, key,
                        template, exc)
    tags["Name"] = hostname
    tags.update(metadata)
    return clean(tags)


def tag_list(tags):
    """boto3's ``[{"Key": k, "Value": v}]`` form."""
    return [{"Key": k, "Value": v} for k, v in clean(tags).items()]


def tag_dict(tag_list_value):
    """The ``{key: value}`` form of boto3's tag list (None -> {})."""
    return {t["Key"]: t.get("Value", "") for t in (tag_list_value or [])}


def tag_specifications(tags, *resource_types):
    return [{"ResourceType": rt, "Tags": tag_list(tags)} for rt in resource_types]


def s3_tagging(tags):
    """The URL-encoded ``Tagging`` argument of S3 uploads (S3 allows at most 10 tags)."""
    return urlencode(list(clean(tags).items())[:10])
