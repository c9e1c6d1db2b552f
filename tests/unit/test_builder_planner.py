"""The builder's decisions as data in, actions out: which images to build, what to upload, what
retention deletes (with a hypothesis check of the "current and previous are never deleted" rule)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from nodepool.builder import planner
from nodepool.builder.planner import BuildNeeded, DeleteBuild, DeleteUpload, UploadNeeded
from nodepool.config.model import Config, DiskImage, Provider, ProviderDiskImage
from nodepool.model.images import (newest_ready_upload, parse_build_file_name, ready_builds,
                                   ready_uploads)
from nodepool.model.records import ImageBuild, ImageUpload
from nodepool.store.base import image_build_lock_path, upload_lock_path

DAY = 86400


def make_config(images=("ubuntu",), providers=None, **image_kw):
    """A config with ``images`` (qcow2) and ``providers`` {name: [image, ...] or {image: pause}}."""
    if providers is None:
        providers = {"cloud-a": list(images), "cloud-b": list(images)}
    config = Config()
    for name in images:
        config.diskimages[name] = DiskImage(name=name, elements=["base"], formats=["qcow2"],
                                            **image_kw)
    for prov_name, listed in providers.items():
        prov = Provider(name=prov_name, driver="simulated")
        if isinstance(listed, dict):
            prov.diskimages = {n: ProviderDiskImage(n, pause=p) for n, p in listed.items()}
        else:
            prov.diskimages = {n: ProviderDiskImage(n) for n in listed}
        config.providers[prov_name] = prov
    return config


def build(image, build_id, state="ready", t=0.0, formats="qcow2"):
    return ImageBuild(image=image, id=build_id, state=state, state_time=t, formats=formats)


def upload(image, build_id, provider, upload_id, state="ready", t=0.0):
    return ImageUpload(image=image, build_id=build_id, provider=provider, id=upload_id,
                       state=state, state_time=t)


# -- model/images ---------------------------------------------------------------------------------

def test_newest_ready_upload_is_by_state_time_and_ignores_other_states():
    ups = [upload("u", "b1", "p", "0000000001", t=10),
           upload("u", "b2", "p", "0000000001", t=30, state="uploading"),
           upload("u", "b3", "p", "0000000001", t=20),
           upload("u", "b4", "q", "0000000001", t=40)]
    assert newest_ready_upload(ups, "u", "p").build_id == "b3"
    assert newest_ready_upload(ups, "u", "zzz") is None
    assert [u.build_id for u in ready_uploads(ups, "u", "p")] == ["b3", "b1"]


def test_deleting_the_current_upload_makes_the_previous_one_current():
    ups = [upload("u", "b1", "p", "1", t=10), upload("u", "b2", "p", "1", t=20)]
    ups[1].state = "deleting"
    assert newest_ready_upload(ups, "u", "p").build_id == "b1"


def test_ready_builds_newest_first():
    bs = [build("u", "a", t=1), build("u", "b", t=3), build("u", "c", state="failed", t=9),
          build("v", "d", t=5)]
    assert [b.id for b in ready_builds(bs, "u")] == ["b", "a"]


def test_parse_build_file_name():
    bid = "0123456789abcdef0123456789abcdef"
    assert parse_build_file_name(f"my-image-{bid}.qcow2.md5") == ("my-image", bid)
    assert parse_build_file_name(f"my-image-{bid}.d") == ("my-image", bid)
    assert parse_build_file_name("img-0000000042.raw") == ("img", "0000000042")
    assert parse_build_file_name("builder_id.txt") is None


# -- builds ---------------------------------------------------------------------------------------

def test_image_without_ready_build_is_built():
    assert planner.images_needing_build(make_config(), [], now=100) == [
        BuildNeeded("ubuntu", "no ready build")]


def test_fresh_ready_build_is_not_rebuilt_but_old_one_is():
    config = make_config(rebuild_age=DAY)
    assert planner.images_needing_build(config, [build("ubuntu", "b1", t=1000)],
                                        now=1000 + DAY - 1) == []
    needed = planner.images_needing_build(config, [build("ubuntu", "b1", t=1000)],
                                          now=1000 + DAY + 1)
    assert [n.image for n in needed] == ["ubuntu"] and "rebuild-age" in needed[0].reason


def test_failed_build_is_retried_next_cycle():
    bs = [build("ubuntu", "b1", state="failed", t=5)]
    assert [n.image for n in planner.images_needing_build(make_config(), bs, now=6)] == ["ubuntu"]


def test_missing_format_triggers_rebuild():
    config = make_config()
    config.diskimages["ubuntu"].formats = ["qcow2", "raw"]
    needed = planner.images_needing_build(config, [build("ubuntu", "b1", t=5)], now=6)
    assert "lacks format raw" in needed[0].reason


def test_manual_request_builds_even_a_fresh_image_and_comes_first():
    config = make_config(images=("aaa", "zzz"))
    bs = [build("zzz", "b1", t=5)]
    needed = planner.images_needing_build(config, bs, build_requests={"zzz"}, now=6)
    assert needed == [BuildNeeded("zzz", "requested by an operator", manual=True),
                      BuildNeeded("aaa", "no ready build")]


def test_paused_abstract_and_formatless_images_are_never_built():
    config = make_config(images=("paused", "flagged", "abstract", "noformat", "ok"))
    config.diskimages["paused"].pause = True
    config.diskimages["abstract"].abstract = True
    config.diskimages["noformat"].formats = []
    needed = planner.images_needing_build(config, [], paused_images={"flagged"},
                                          build_requests={"paused", "flagged", "abstract"},
                                          now=1)
    assert [n.image for n in needed] == ["ok"]


# -- uploads --------------------------------------------------------------------------------------

def test_newest_ready_build_is_uploaded_to_every_listing_provider():
    config = make_config(providers={"a": ["ubuntu"], "b": ["ubuntu"], "c": []})
    bs = [build("ubuntu", "old", t=1), build("ubuntu", "new", t=2),
          build("ubuntu", "newer-failed", state="failed", t=3)]
    assert planner.uploads_needed(config, bs, []) == [
        UploadNeeded("ubuntu", "new", "a", "qcow2"), UploadNeeded("ubuntu", "new", "b", "qcow2")]


def test_no_upload_when_one_is_ready_or_in_progress_but_failed_is_retried():
    config = make_config(providers={"a": ["ubuntu"], "b": ["ubuntu"], "c": ["ubuntu"]})
    bs = [build("ubuntu", "b1", t=1)]
    ups = [upload("ubuntu", "b1", "a", "1"), upload("ubuntu", "b1", "b", "1", state="uploading"),
           upload("ubuntu", "b1", "c", "1", state="failed")]
    assert planner.uploads_needed(config, bs, ups) == [UploadNeeded("ubuntu", "b1", "c", "qcow2")]


def test_paused_provider_image_and_missing_format_get_no_upload():
    config = make_config(providers={"paused": {"ubuntu": True}, "rawcloud": ["ubuntu"],
                                    "ok": ["ubuntu"]})
    config.providers["rawcloud"].options["image-format"] = "raw"
    bs = [build("ubuntu", "b1", t=1)]
    assert planner.uploads_needed(config, bs, []) == [UploadNeeded("ubuntu", "b1", "ok", "qcow2")]


def test_uploads_limited_to_builds_on_this_builder():
    config = make_config(providers={"a": ["ubuntu"]})
    bs = [build("ubuntu", "b1", t=1)]
    assert planner.uploads_needed(config, bs, [], local_build_ids=set()) == []
    assert planner.uploads_needed(config, bs, [], local_build_ids={"b1"}) != []


# -- retention ------------------------------------------------------------------------------------

def three_builds_two_providers():
    bs = [build("ubuntu", f"b{i}", t=i * 100) for i in (1, 2, 3)]
    ups = [upload("ubuntu", f"b{i}", p, "0000000001", t=i * 100 + 10)
           for i in (1, 2, 3) for p in ("cloud-a", "cloud-b")]
    return bs, ups


def test_retention_after_three_builds_deletes_the_oldest_everywhere():
    bs, ups = three_builds_two_providers()
    actions = planner.plan_retention(make_config(), bs, ups)
    assert actions == [
        DeleteUpload("ubuntu", "b1", "cloud-a", "0000000001",
                     "older than the two newest ready uploads"),
        DeleteUpload("ubuntu", "b1", "cloud-b", "0000000001",
                     "older than the two newest ready uploads"),
        DeleteBuild("ubuntu", "b1", "older than the two newest ready builds")]


def test_old_build_stays_while_it_carries_a_provider_s_previous_upload():
    # cloud-b never got b3: its current and previous uploads are b2 and b1, so b1 stays.
    bs, ups = three_builds_two_providers()
    ups = [u for u in ups if not (u.build_id == "b3" and u.provider == "cloud-b")]
    actions = planner.plan_retention(make_config(), bs, ups)
    assert actions == [DeleteUpload("ubuntu", "b1", "cloud-a", "0000000001",
                                    "older than the two newest ready uploads")]


def test_failed_and_deleting_records_are_removed():
    bs = [build("ubuntu", "good", t=10), build("ubuntu", "bad", state="failed", t=20),
          build("ubuntu", "gone", state="deleting", t=5)]
    ups = [upload("ubuntu", "good", "cloud-a", "1", state="failed"),
           upload("ubuntu", "good", "cloud-a", "2", state="deleting"),
           upload("ubuntu", "gone", "cloud-a", "1")]
    actions = planner.plan_retention(make_config(), bs, ups)
    assert set(actions) == {
        DeleteUpload("ubuntu", "good", "cloud-a", "1", "upload failed"),
        DeleteUpload("ubuntu", "good", "cloud-a", "2", "marked deleting"),
        DeleteUpload("ubuntu", "gone", "cloud-a", "1", "older than the two newest ready uploads"),
        DeleteBuild("ubuntu", "bad", "build failed"),
        DeleteBuild("ubuntu", "gone", "marked deleting")}


def test_in_progress_records_are_kept_abandoned_ones_removed():
    bs = [build("ubuntu", "b1", t=1), build("ubuntu", "b2", state="building", t=2)]
    ups = [upload("ubuntu", "b1", "cloud-a", "1", state="uploading")]
    probe = planner.lock_paths_to_probe(bs, ups)
    assert probe == {image_build_lock_path("ubuntu"),
                     upload_lock_path("ubuntu", "b1", "cloud-a")}
    assert planner.plan_retention(make_config(), bs, ups, held_locks=probe) == []
    assert set(planner.plan_retention(make_config(), bs, ups, held_locks=())) == {
        DeleteUpload("ubuntu", "b1", "cloud-a", "1", "abandoned upload (its lock is free)"),
        DeleteBuild("ubuntu", "b2", "abandoned build (its image build lock is free)")}


def test_image_removed_from_config_loses_everything():
    bs, ups = three_builds_two_providers()
    actions = planner.plan_retention(make_config(images=("other",)), bs, ups)
    assert {a.build_id for a in actions if isinstance(a, DeleteBuild)} == {"b1", "b2", "b3"}
    assert len([a for a in actions if isinstance(a, DeleteUpload)]) == 6


def test_provider_no_longer_listing_the_image_loses_its_uploads_only():
    bs, ups = three_builds_two_providers()
    config = make_config(providers={"cloud-a": ["ubuntu"], "cloud-b": []})
    actions = planner.plan_retention(config, bs, ups)
    deleted = {(a.build_id, a.provider) for a in actions if isinstance(a, DeleteUpload)}
    assert deleted == {("b1", "cloud-a"), ("b1", "cloud-b"), ("b2", "cloud-b"), ("b3", "cloud-b")}
    assert [a.build_id for a in actions if isinstance(a, DeleteBuild)] == ["b1"]


def test_local_files_of_missing_failed_and_deleting_builds_are_removed():
    bid = {k: k * 32 for k in "abcde"}
    bs = [build("u", bid["a"]), build("u", bid["b"], state="building"),
          build("u", bid["c"], state="failed"), build("u", bid["d"], state="deleting")]
    names = [f"u-{bid[k]}.qcow2" for k in "abcde"] + [f"u-{bid['e']}.d", "builder_id.txt"]
    assert planner.local_files_to_remove(names, bs) == sorted(
        [f"u-{bid['c']}.qcow2", f"u-{bid['d']}.qcow2", f"u-{bid['e']}.qcow2", f"u-{bid['e']}.d"])


def test_delete_after_upload_drops_formats_uploaded_everywhere_except_kept_ones():
    config = make_config(providers={"a": ["ubuntu"], "b": ["ubuntu"], "r": ["ubuntu"]},
                         delete_after_upload=True)
    config.providers["r"].options["image-format"] = "raw"
    config.diskimages["ubuntu"].formats = ["qcow2", "raw", "tar"]
    bs = [build("ubuntu", "b1", t=1, formats="qcow2,raw,tar")]
    ups = [upload("ubuntu", "b1", "a", "1"), upload("ubuntu", "b1", "r", "1")]
    assert planner.formats_to_drop(config, bs, ups) == [
        planner.DropFormat("ubuntu", "b1", "raw")]          # b has no qcow2 yet; tar: nobody
    ups.append(upload("ubuntu", "b1", "b", "1"))
    assert {d.format for d in planner.formats_to_drop(config, bs, ups)} == {"qcow2", "raw"}
    config.diskimages["ubuntu"].keep_formats = ["qcow2"]
    assert {d.format for d in planner.formats_to_drop(config, bs, ups)} == {"raw"}
    config.diskimages["ubuntu"].delete_after_upload = False
    assert planner.formats_to_drop(config, bs, ups) == []


# -- the retention invariant ------------------------------------------------------------------------

IMAGES = ("img-a", "img-b", "img-gone")
PROVIDERS = ("p1", "p2", "p3")
BUILD_STATES = ("building", "ready", "ready", "ready", "failed", "deleting")
UPLOAD_STATES = ("uploading", "ready", "ready", "ready", "failed", "deleting")


@st.composite
def histories(draw):
    """Any mix of builds and uploads, states and times, with any lock held or free."""
    times = st.integers(min_value=0, max_value=50)
    builds = []
    for i in range(draw(st.integers(0, 10))):
        builds.append(build(draw(st.sampled_from(IMAGES)), f"b{i:02d}",
                            state=draw(st.sampled_from(BUILD_STATES)), t=draw(times),
                            formats=draw(st.sampled_from(["qcow2", "raw", "qcow2,raw"]))))
    uploads = []
    for j in range(draw(st.integers(0, 25))):
        if not builds:
            break
        b = draw(st.sampled_from(builds))
        uploads.append(upload(b.image, b.id, draw(st.sampled_from(PROVIDERS)), f"{j:010d}",
                              state=draw(st.sampled_from(UPLOAD_STATES)), t=draw(times)))
    listed = {p: draw(st.lists(st.sampled_from(IMAGES[:2]), unique=True)) for p in PROVIDERS}
    config = make_config(images=IMAGES[:2], providers=listed)
    probe = sorted(planner.lock_paths_to_probe(builds, uploads))
    held = draw(st.sets(st.sampled_from(probe))) if probe else set()
    return config, builds, uploads, held


@settings(max_examples=300, deadline=None)
@given(histories())
def test_current_and_previous_ready_uploads_and_two_newest_builds_are_never_deleted(history):
    config, builds, uploads, held = history
    actions = planner.plan_retention(config, builds, uploads, held)
    deleted_uploads = {(a.image, a.build_id, a.provider, a.upload_id)
                       for a in actions if isinstance(a, DeleteUpload)}
    deleted_builds = {(a.image, a.build_id) for a in actions if isinstance(a, DeleteBuild)}
    ready_build_keys = {(b.image, b.id) for b in builds if b.state == "ready"}

    for prov_name, prov in config.providers.items():
        for image in prov.diskimages:
            candidates = [u for u in ready_uploads(uploads, image, prov_name)
                          if (u.image, u.build_id) in ready_build_keys]
            for u in candidates[:2]:
                assert (u.image, u.build_id, u.provider, u.id) not in deleted_uploads
                assert (u.image, u.build_id) not in deleted_builds
    for image in config.diskimages:
        for b in ready_builds(builds, image)[:2]:
            assert (b.image, b.id) not in deleted_builds

    # A build is only deleted once every upload of it is being deleted too.
    for image, build_id in deleted_builds:
        for u in uploads:
            if (u.image, u.build_id) == (image, build_id):
                assert (u.image, u.build_id, u.provider, u.id) in deleted_uploads
    # Work in progress (lock held) is never touched.
    for u in uploads:
        if u.state == "uploading" and upload_lock_path(u.image, u.build_id, u.provider) in held:
            assert (u.image, u.build_id, u.provider, u.id) not in deleted_uploads
    for b in builds:
        if b.state == "building" and image_build_lock_path(b.image) in held:
            assert (b.image, b.id) not in deleted_builds
    # Everything of an image gone from the config goes, unless still in progress.
    for b in builds:
        if b.image == "img-gone" and b.state in ("ready", "failed", "deleting"):
            busy = any(u.state == "uploading" and
                       upload_lock_path(u.image, u.build_id, u.provider) in held
                       for u in uploads if u.build_id == b.id)
            assert busy or (b.image, b.id) in deleted_builds


def test_upload_withdrawn_by_an_operator_is_not_made_again():
    """Reverting a bad image by deleting its upload must stick until the next build."""
    from nodepool.builder.planner import WITHDRAWN_KEY, uploads_needed
    from nodepool.config.model import Config, DiskImage, Provider, ProviderDiskImage
    from nodepool.model import ImageBuild
    config = Config(diskimages={"img": DiskImage("img", formats=["qcow2"])},
                    providers={"p1": Provider("p1", "simulated",
                                              diskimages={"img": ProviderDiskImage("img")}),
                               "p2": Provider("p2", "simulated",
                                              diskimages={"img": ProviderDiskImage("img")})})
    bad = ImageBuild(image="img", id="b2", state="ready", state_time=2.0, formats="qcow2")
    bad.extra[WITHDRAWN_KEY] = ["p1"]
    needed = uploads_needed(config, [bad], [])
    assert [(u.build_id, u.provider) for u in needed] == [("b2", "p2")]


def test_rollout_retention_keeps_the_serving_upload_while_newer_ones_roll_out():
    """Under rollout the current upload may be older than the two newest: it is kept (and its
    build with it) until a newer upload becomes current."""
    from nodepool.config.rollout import RolloutPolicy
    from nodepool.model.rollout import CURRENT, ROLLING, VALIDATING, Rollout
    config = make_config(providers={"cloud-a": ["ubuntu"]}, rollout=RolloutPolicy())
    builds = [build("ubuntu", f"b{n}", t=float(n)) for n in range(1, 5)]
    uploads = [upload("ubuntu", f"b{n}", "cloud-a", "0000000001", t=float(n))
               for n in range(1, 5)]
    Rollout(phase=CURRENT).store(uploads[0])
    Rollout(phase=ROLLING).store(uploads[2])
    Rollout(phase=VALIDATING).store(uploads[3])
    doomed = {(a.build_id) for a in planner.plan_retention(config, builds, uploads)
              if isinstance(a, DeleteUpload)}
    assert doomed == {"b2"}                      # superseded; b1 serves, b3/b4 are the newest
    assert "b1" not in {a.build_id for a in planner.plan_retention(config, builds, uploads)}
    # without a policy the old rule applies: the two newest stay, b1 goes
    plain = make_config(providers={"cloud-a": ["ubuntu"]})
    assert {a.build_id for a in planner.plan_retention(plain, builds, uploads)
            if isinstance(a, DeleteUpload)} == {"b1", "b2"}
