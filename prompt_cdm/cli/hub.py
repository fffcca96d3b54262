"""`prompt-cdm hub push|pull`: sharing adapter folders."""
from __future__ import annotations


def cmd_hub_push(a) -> None:
    from ..hub.hub import push

    where = push(a.adapter_dir, a.dest, revision=a.revision, private=a.private, overwrite=a.overwrite)
    print(f"pushed {a.adapter_dir} -> {where}")


def cmd_hub_pull(a) -> None:
    from ..hub.hub import pull

    folder = pull(a.src, a.into, revision=a.revision, backbone=a.backbone, overwrite=a.overwrite)
    print(f"pulled {a.src} -> {folder} (checksums verified" + (f", loads on {a.backbone})" if a.backbone else ")"))


def add_parsers(sub) -> None:
    where = ("a hub repo owner/name (or hf://owner/name), a folder path, or an fsspec URL (file://, memory://, "
             "s3://, gs://, ... with its fsspec package installed)")
    h = sub.add_parser("hub", help="share adapter folders: push to / pull from the Hugging Face Hub or any fsspec "
                       "location (token: HF_TOKEN or `hf auth login`; endpoint: HF_ENDPOINT)")
    hs = h.add_subparsers(dest="hub_cmd", required=True)
    hp = hs.add_parser("push", help="validate an adapter folder and upload it with checksums.json (one hub commit)")
    hp.add_argument("adapter_dir", help="the adapter folder (save_adapter / train output); it is not modified")
    hp.add_argument("dest", help=where)
    hp.add_argument("--revision", default=None, help="hub: the branch to commit to (created if missing; default main)")
    hp.add_argument("--private", action="store_true", default=None,
                    help="hub: the repo must be private (created private; an existing public repo is refused)")
    hp.add_argument("--overwrite", action="store_true",
                    help="folder/URL: replace an adapter pushed there before (hub history keeps old pushes)")
    hp.set_defaults(func=cmd_hub_push)
    hl = hs.add_parser("pull", help="download an adapter, verify checksums and the folder, then move it into place")
    hl.add_argument("src", help=where)
    hl.add_argument("--into", required=True, metavar="DIR", help="the adapter folder to create")
    hl.add_argument("--revision", default=None, help="hub: branch, tag or commit (default main)")
    hl.add_argument("--backbone", default=None, metavar="NAME",
                    help="also load the adapter onto this backbone ('tiny', an SD folder or a hub id) to check it fits")
    hl.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    hl.set_defaults(func=cmd_hub_pull)
