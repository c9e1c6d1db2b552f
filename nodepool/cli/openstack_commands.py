"""``nodepool alien-image-list [PROVIDER]``: Glance images tagged as ours that no ready upload
record owns (OpenStack providers only; the builder does not reap them automatically)."""
import prettytable

from ..model.states import UploadState
from .common import CliError, arg, command


def alien_images(provider_name, images, uploads):
    """Images (``CloudResource``) of ``provider_name`` with no ready upload of that provider."""
    owned = {str(u.external_id) for u in uploads
             if u.provider == provider_name and u.state == UploadState.READY and u.external_id}
    return [img for img in images if str(img.id) not in owned]


@command("alien-image-list", "list Glance images carrying our properties but no ready upload "
         "record", arguments=[arg("provider", nargs="?", help="only this provider")])
def cmd_alien_image_list(ctx, args):
    from ..drivers import get_driver
    config = ctx.config
    providers = [p for p in config.providers.values() if p.driver == "openstack"]
    if args.provider:
        providers = [p for p in providers if p.name == args.provider]
        if not providers:
            raise CliError(f"no OpenStack provider named {args.provider!r} in {config.path}")
    uploads = ctx.store.list_uploads()
    table = prettytable.PrettyTable(["Provider", "Name", "Image ID"])
    table.align = "l"
    status = 0
    for provider in providers:
        adapter = get_driver(provider.driver).adapter(provider)
        try:
            images = adapter.list_images()
        except Exception as exc:
            ctx.warn(f"provider {provider.name}: cannot list images: {exc}")
            status = 1
            continue
        finally:
            adapter.stop()
        for image in alien_images(provider.name, images, uploads):
            table.add_row([provider.name, image.name, image.id])
    ctx.print(str(table))
    return status
