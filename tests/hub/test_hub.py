"""Sharing adapters (prompt_cdm.hub): push/pull round trips on fsspec (memory://, a folder, file://) and on
the Hugging Face Hub through the real huggingface_hub client talking to a loopback test double
(tests/hub/hub_double.py); checksum tampering, refusals (pickles, corrupt safetensors, shapes, foreign
locations), atomic pulls, error messages, the CLI. Offline: nothing leaves 127.0.0.1."""
from __future__ import annotations

import importlib
import json
import shutil
import uuid

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from hub_double import Blob, FakeHub, Repo
from prompt_cdm.adapters import LoraAdapterConfig, SoftPromptConfig, lora, save_adapter, soft_prompt
from prompt_cdm.adapters.store import CONFIG_NAME, SOFT_PROMPT_DIFFUSERS_NAME, WEIGHTS_NAME
from prompt_cdm.hub.hub import CHECKSUMS_NAME, HubError, compute_checksums, parse_location, pull, push




@pytest.fixture(scope="module", autouse=True)
def clean_memory_fs():
    yield
    fs = fsspec.filesystem("memory")
    if fs.exists("/cdm-hub-test"):
        fs.rm("/cdm-hub-test", recursive=True)


@pytest.fixture(scope="module")
def adapters(random_tiny, tmp_path_factory):
    """{kind: folder} saved on the random tiny pipeline (a soft prompt; a LoRA on UNet + text encoder)."""
    root = tmp_path_factory.mktemp("hub-adapters")
    g = torch.Generator().manual_seed(0)
    sp = soft_prompt.create(random_tiny, SoftPromptConfig("<cdm-stars>", 3, init_word="star"), generator=g)
    lo = lora.create(random_tiny, LoraAdapterConfig(rank=2, alpha=2.0, text_encoder=True), generator=g)
    lo.tensors = {k: v + 0.01 for k, v in lo.tensors.items()}
    return {"soft-prompt": save_adapter(root / "stars-sp", sp, random_tiny, source_id="stars"),
            "lora": save_adapter(root / "stars-lora", lo, random_tiny, source_id="stars")}


def _tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _memory_url() -> str:
    return f"memory://cdm-hub-test/{uuid.uuid4().hex[:8]}/shared/stars"


def _assert_nothing_left(into):
    assert not into.exists()
    assert not [p.name for p in into.parent.iterdir() if p.name.startswith(f".{into.name}.")], "temp folder left"


# ---------------------------------------------------------------- fsspec and folders


@pytest.mark.parametrize("kind", ["soft-prompt", "lora"])
@pytest.mark.parametrize("where", ["memory", "folder", "file-url"])
def test_round_trip_is_byte_identical_and_leaves_the_source_alone(adapters, tmp_path, kind, where):
    src = adapters[kind]
    before = _tree(src)
    dest = {"memory": _memory_url(), "folder": str(tmp_path / "shared" / "stars"),
            "file-url": f"file://{tmp_path}/shared/stars"}[where]
    assert push(src, dest).endswith("shared/stars")
    assert _tree(src) == before and not (src / CHECKSUMS_NAME).exists()  # the user's folder is not modified

    got = pull(dest, tmp_path / "pulled" / "stars")
    pulled = _tree(got)
    assert json.loads(pulled.pop(CHECKSUMS_NAME)) == compute_checksums(src)
    assert pulled == before


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])  # same size, one weight changed


DAMAGES = {
    "tampered file": (lambda fs, r: fs.pipe(f"{r}/{CONFIG_NAME}",
                                            fs.cat(f"{r}/{CONFIG_NAME}").replace(b"stars", b"starz")),
                      rf"{CONFIG_NAME} does not match {CHECKSUMS_NAME} \(sha256 .*changed or corrupted after the push"),
    "tampered weights": (lambda fs, r: fs.pipe(f"{r}/{WEIGHTS_NAME}", _flip_last_byte(fs.cat(f"{r}/{WEIGHTS_NAME}"))),
                         rf"{WEIGHTS_NAME} does not match {CHECKSUMS_NAME}"),
    "missing file": (lambda fs, r: fs.rm_file(f"{r}/{SOFT_PROMPT_DIFFUSERS_NAME}"),
                     rf"{SOFT_PROMPT_DIFFUSERS_NAME} is listed in {CHECKSUMS_NAME} but missing"),
    "extra file": (lambda fs, r: fs.pipe(f"{r}/notes.txt", b"hello"), rf"notes.txt is not listed in {CHECKSUMS_NAME}"),
    "no checksums": (lambda fs, r: fs.rm_file(f"{r}/{CHECKSUMS_NAME}"),
                     rf"has no {CHECKSUMS_NAME}: it was not pushed with `prompt-cdm hub push`"),
    "bad checksums": (lambda fs, r: fs.pipe(f"{r}/{CHECKSUMS_NAME}", b'{"files": []}'),
                      r"is not a prompt_cdm/checksums"),
    "escaping path": (lambda fs, r: fs.pipe(f"{r}/{CHECKSUMS_NAME}", fs.cat(f"{r}/{CHECKSUMS_NAME}").replace(
        b'"README.md"', b'"../README.md"')), r"malformed entry '../README.md'"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_pull_refuses_a_damaged_push_and_leaves_nothing(adapters, tmp_path, damage):
    url = _memory_url()
    push(adapters["soft-prompt"], url)
    fs, root = fsspec.core.url_to_fs(url)
    fn, message = DAMAGES[damage]
    fn(fs, root)
    into = tmp_path / "got"
    with pytest.raises(HubError, match=message):
        pull(url, into)
    _assert_nothing_left(into)


def _rewrite(folder, name, fn):
    tensors = load_file(folder / name)
    save_file(fn(tensors), str(folder / name))


REFUSALS = {
    "pickle file": (lambda f: (f / "optimizer.bin").write_bytes(b"\x80\x04N."), r"optimizer\.bin is a pickle file"),
    "pickle in subfolder": (lambda f: ((f / "ckpt").mkdir(), (f / "ckpt" / "model.pt").write_bytes(b"x")),
                            r"ckpt/model\.pt is a pickle file.*safetensors only"),
    "truncated weights": (lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:-10]),
                          rf"{WEIGHTS_NAME} is truncated or corrupt"),
    "garbage diffusers file": (lambda f: (f / SOFT_PROMPT_DIFFUSERS_NAME).write_bytes(b"\0" * 40),
                               rf"{SOFT_PROMPT_DIFFUSERS_NAME} is truncated or corrupt"),
    "missing weights": (lambda f: (f / WEIGHTS_NAME).unlink(), rf"{WEIGHTS_NAME} is missing"),
    "missing config": (lambda f: (f / CONFIG_NAME).unlink(), rf"{CONFIG_NAME} is missing"),
    "unknown config key": (lambda f: (f / CONFIG_NAME).write_text(json.dumps(
        {**json.loads((f / CONFIG_NAME).read_text()), "rank_bonus": 1})), r"unknown key 'rank_bonus'"),
    "wrong num_vectors": (lambda f: _rewrite(f, WEIGHTS_NAME, lambda t: {k: v[:2] for k, v in t.items()}),
                          r"soft_prompt\.embeds is F32 \[2, 64\].*num_vectors=3"),
    "diffusers copy disagrees": (lambda f: _rewrite(f, SOFT_PROMPT_DIFFUSERS_NAME,
                                                    lambda t: {"<cdm-other>": t["<cdm-stars>"]}),
                                 r"learned_embeds\.safetensors: expected one tensor '<cdm-stars>'"),
}
LORA_REFUSALS = {
    "rank mismatch": (lambda f: _rewrite(f, WEIGHTS_NAME, lambda t: {
        k: (v[:1] if ".lora_A." in k else v[:, :1]).contiguous() for k, v in t.items()}), r"has rank 1/1.*says rank 2"),
    "missing partner": (lambda f: _rewrite(f, WEIGHTS_NAME, lambda t: {
        k: v for k, v in t.items() if not (k.startswith("text_encoder.") and ".lora_B." in k)}),
                        r"lora_A but not its partner"),
    "foreign key": (lambda f: _rewrite(f, WEIGHTS_NAME,
                                       lambda t: {**t, "vae.encoder.lora_A.weight": torch.zeros(2, 4)}),
                    r"'vae\.encoder\.lora_A\.weight' is not a LoRA key"),
}


@pytest.mark.parametrize("kind,refusal", [("soft-prompt", r) for r in REFUSALS] + [("lora", r) for r in LORA_REFUSALS])
def test_push_refuses_an_invalid_folder_and_uploads_nothing(adapters, tmp_path, kind, refusal):
    folder = tmp_path / "broken"
    shutil.copytree(adapters[kind], folder)
    damage, message = {**REFUSALS, **LORA_REFUSALS}[refusal]
    damage(folder)
    url = _memory_url()
    with pytest.raises(HubError, match=message) as e:
        push(folder, url)
    assert str(folder) in str(e.value) and "prompt-cdm-push-" not in str(e.value)  # names the user's folder
    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(root)
    assert not (folder / CHECKSUMS_NAME).exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_pull_validates_even_when_the_checksums_agree(adapters, tmp_path, damage):
    """A pusher that bypassed `hub push` (or a compromised location) can write consistent checksums."""
    staged = tmp_path / "bad"
    shutil.copytree(adapters["soft-prompt"], staged)
    if damage == "pickle":
        (staged / "optimizer.pt").write_bytes(b"\x80\x04N.")
    else:
        (staged / WEIGHTS_NAME).write_bytes((staged / WEIGHTS_NAME).read_bytes()[:-10])
    (staged / CHECKSUMS_NAME).write_text(json.dumps(compute_checksums(staged)))
    url = _memory_url()
    fs, root = fsspec.core.url_to_fs(url)
    fs.put(str(staged) + "/", root, recursive=True)
    into = tmp_path / "got"
    with pytest.raises(HubError, match="pickle file" if damage == "pickle" else "truncated or corrupt") as e:
        pull(url, into)
    assert url in str(e.value) and ".pull" not in str(e.value)  # names the source, not the temp folder
    _assert_nothing_left(into)


def test_pull_checks_the_adapter_on_a_backbone(random_tiny, adapters, tmp_path):
    n_tokens = len(random_tiny.tokenizer)
    for kind, folder in adapters.items():
        url = _memory_url()
        push(folder, url)
        pull(url, tmp_path / kind, backbone=random_tiny)
        assert len(random_tiny.tokenizer) == n_tokens and lora.names(random_tiny) == []  # taken off again

    other = tmp_path / "other-backbone"
    shutil.copytree(adapters["lora"], other)
    cfg = json.loads((other / CONFIG_NAME).read_text())
    (other / CONFIG_NAME).write_text(json.dumps({**cfg, "backbone_fingerprint": "0123456789abcdef"}))
    url = _memory_url()
    push(other, url)  # valid without a pipeline
    into = tmp_path / "got"
    with pytest.raises(HubError, match=r"does not load on backbone .*trained on backbone 0123456789abcdef"):
        pull(url, into, backbone=random_tiny)
    _assert_nothing_left(into)


def test_occupied_locations_and_overwrite(adapters, tmp_path):
    url = _memory_url()
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/model.ckpt", b"someone else's")
    with pytest.raises(HubError, match=r"already holds files \(model\.ckpt, \.\.\.\) and no checksums\.json"):
        push(adapters["lora"], url)
    assert fs.cat(f"{root}/model.ckpt") == b"someone else's"

    url = _memory_url()
    push(adapters["soft-prompt"], url)
    with pytest.raises(HubError, match="already holds a pushed adapter; pass --overwrite"):
        push(adapters["lora"], url)
    push(adapters["lora"], url, overwrite=True)  # stale soft-prompt files are removed
    got = _tree(pull(url, tmp_path / "got"))
    got.pop(CHECKSUMS_NAME)
    assert got == _tree(adapters["lora"])

    into = tmp_path / "busy"
    into.mkdir()
    (into / "keep.txt").write_text("mine")
    with pytest.raises(HubError, match="exists and is not an empty folder; pass --overwrite"):
        pull(url, into)
    assert _tree(into) == {"keep.txt": b"mine"}
    pull(url, into, overwrite=True)
    assert "keep.txt" not in _tree(into) and (into / WEIGHTS_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    with pytest.raises(HubError, match="one lies inside the other"):
        push(adapters["lora"], str(adapters["lora"] / "copy"))
    with pytest.raises(HubError, match="one lies inside the other"):
        push(adapters["lora"], f"file://{adapters['lora'].parent}")
    with pytest.raises(HubError, match="--revision and --private apply to hub repos"):
        push(adapters["lora"], _memory_url(), revision="v2")


def test_locations_and_missing_fsspec_backends(adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_location("alice/stars-lora").repo_id == "alice/stars-lora"
    assert parse_location("hf://alice/stars-lora").repo_id == "alice/stars-lora"
    assert parse_location("s3://bucket/adapters/stars").url == "s3://bucket/adapters/stars"
    for local in ("./alice/stars", "/abs/alice/stars", "stars", "a/b/c"):
        assert not parse_location(local).is_hub
    (tmp_path / "alice" / "stars").mkdir(parents=True)
    assert parse_location("alice/stars").url == str(tmp_path / "alice" / "stars")  # an existing folder wins
    with pytest.raises(HubError, match="neither a hub repo id"):
        parse_location("alice/st ars")

    monkeypatch.setitem(importlib.import_module("fsspec.registry").known_implementations, "cdmfake",
                        {"class": "cdm_no_such_package.FakeFS", "err": "Install cdm_no_such_package for cdmfake"})
    with pytest.raises(HubError, match=r"backend for cdmfake:// is not installed.*pip install cdm_no_such_package"):
        push(adapters["lora"], "cdmfake://bucket/stars")
    with pytest.raises(HubError, match="protocol fsspec knows"):
        pull("nope-proto://x/y", tmp_path / "got")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(HubError, match=r"s3://.*pip install s3fs"):
            pull("s3://bucket/adapters/stars", tmp_path / "got")
        _assert_nothing_left(tmp_path / "got")


# ---------------------------------------------------------------- the Hugging Face Hub (test double)


@pytest.fixture(scope="module")
def fake_hub():
    with FakeHub() as server:
        yield server


def _loopback_only_client():
    """huggingface_hub's own client, refusing any host but 127.0.0.1 (fails the test instead of leaking)."""
    from huggingface_hub.utils import _http

    client = _http.default_client_factory()

    def guard(request):
        if request.url.host != "127.0.0.1":
            raise RuntimeError(f"test tried to reach {request.url}")

    hooks = client.event_hooks
    hooks["request"] = [guard] + list(hooks["request"])
    client.event_hooks = hooks
    return client


@pytest.fixture
def hf(fake_hub, monkeypatch, tmp_path):
    """The real huggingface_hub client pointed at the double: online mode (conftest sets HF_HUB_OFFLINE=1),
    the endpoint constants as HF_ENDPOINT would set them, a token in HF_TOKEN, caches in tmp, the
    agent-registry fetch off (it would go to the endpoint), loopback-only HTTP."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent, _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # what HF_ENDPOINT gives when set before import: hf_hub_download builds URLs from the template, and
    # create_repo(exist_ok=True) after a 403 parses the repo URL against HF_URL_HOSTS
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    monkeypatch.setenv("HF_TOKEN", fake_hub.write_token)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    # The double does LFS "basic" transfers, not Xet (hf_xet's own Rust client): with the double asking for LFS,
    # the client must take its legacy LFS path. test_hf_round_trip[regular] runs with Xet on.
    fake_hub.lfs = True
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    huggingface_hub.set_client_factory(_loopback_only_client)
    yield fake_hub
    huggingface_hub.set_client_factory(_http.default_client_factory)
    assert fake_hub.unhandled == [], f"the client called endpoints the double lacks: {fake_hub.unhandled}"


def _repo() -> str:
    return f"tester/stars-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("mode", ["lfs", "regular"])
def test_hf_round_trip(hf, adapters, tmp_path, monkeypatch, mode):
    """lfs: the double asks for LFS on *.safetensors (as the hub does) and Xet is off, so the client runs
    preupload -> LFS batch -> PUT -> verify -> commit with lfsFile. regular: every file inline (base64) in
    the commit, with the client's default Xet setting."""
    from huggingface_hub import constants

    hf.lfs = mode == "lfs"
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", mode == "lfs")
    repo, src = _repo(), adapters["soft-prompt"]
    url = push(src, repo, private=True, endpoint=hf.url)
    assert url.startswith(f"{hf.url}/{repo}/commit/")
    assert hf.repos[repo].private
    blobs = hf.head_blobs(repo)
    assert {p: b.data for p, b in blobs.items() if p != ".gitattributes"} == {
        **_tree(src), CHECKSUMS_NAME: (json.dumps(compute_checksums(src), indent=2) + "\n").encode()}
    lfs_files = {WEIGHTS_NAME, SOFT_PROMPT_DIFFUSERS_NAME} if mode == "lfs" else set()
    assert {p for p, b in blobs.items() if b.lfs} == lfs_files

    got = _tree(pull(repo, tmp_path / "got", endpoint=hf.url))
    got.pop(CHECKSUMS_NAME)
    assert got == _tree(src)  # .gitattributes (hub housekeeping) and .cache/huggingface are not kept


def test_hf_update_branch_and_tampering(hf, adapters, tmp_path):
    repo = _repo()
    push(adapters["soft-prompt"], repo, endpoint=hf.url)
    n_commits = len(hf.repos[repo].commits)
    push(adapters["lora"], repo, endpoint=hf.url)  # one commit: lora files in, stale soft-prompt files out
    assert len(hf.repos[repo].commits) == n_commits + 1
    assert set(hf.files(repo)) == set(_tree(adapters["lora"])) | {CHECKSUMS_NAME, ".gitattributes"}
    push(adapters["soft-prompt"], repo, revision="v1", endpoint=hf.url)  # a new branch, main untouched
    assert set(hf.files(repo)) == set(_tree(adapters["lora"])) | {CHECKSUMS_NAME, ".gitattributes"}

    got = _tree(pull(repo, tmp_path / "v1", revision="v1", endpoint=hf.url))
    got.pop(CHECKSUMS_NAME)
    assert got == _tree(adapters["soft-prompt"])

    config = hf.files(repo)[CONFIG_NAME]
    hf.commit(repo, {CONFIG_NAME: config.replace(b"stars", b"starz")})  # someone edits the file on the hub
    with pytest.raises(HubError, match=rf"{repo}: {CONFIG_NAME} does not match {CHECKSUMS_NAME}"):
        pull(repo, tmp_path / "tampered", endpoint=hf.url)
    _assert_nothing_left(tmp_path / "tampered")
    hf.commit(repo, {CONFIG_NAME: config, "extra.safetensors": b"\0" * 8})
    with pytest.raises(HubError, match=rf"extra\.safetensors is not listed in {CHECKSUMS_NAME}"):
        pull(repo, tmp_path / "extra", endpoint=hf.url)
    _assert_nothing_left(tmp_path / "extra")


def test_hf_errors_name_the_problem_and_the_fix(hf, adapters, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = adapters["lora"]
    foreign = _repo()
    hf.repos[foreign] = Repo(private=False)
    hf._new_commit(hf.repos[foreign], "main", {"model.safetensors": Blob(b"x", lfs=True)}, "someone's model")
    with pytest.raises(HubError, match=rf"hub repo {foreign} already holds files \(model\.safetensors"):
        push(folder, foreign, endpoint=hf.url)

    public = _repo()
    push(folder, public, endpoint=hf.url)
    with pytest.raises(HubError, match=rf"hub repo {public} exists and is public, so --private cannot apply"):
        push(folder, public, private=True, endpoint=hf.url)

    private = _repo()
    push(folder, private, private=True, endpoint=hf.url)
    with pytest.raises(HubError, match=r"has no revision 'nope'; pass an existing branch"):
        pull(private, tmp_path / "got", revision="nope", endpoint=hf.url)
    with pytest.raises(HubError, match=r"cannot pull from tester/missing: the repo does not exist, or it is private"):
        pull("tester/missing", tmp_path / "got", endpoint=hf.url)

    monkeypatch.setenv("HF_TOKEN", hf.read_token)
    with pytest.raises(HubError, match=r"cannot push to .*no permission.*write access"):
        push(folder, private, endpoint=hf.url)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match=r"cannot pull from .*private.*set HF_TOKEN or run `hf auth login`"):
        pull(private, tmp_path / "got", endpoint=hf.url)
    with pytest.raises(HubError, match=r"cannot push to .*not logged in.*HF_TOKEN.*write access"):
        push(folder, _repo(), endpoint=hf.url)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\); unset HF_HUB_OFFLINE"):
        pull(private, tmp_path / "got", endpoint=hf.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(RuntimeError, match="test tried to reach http://192.0.2.1"):  # the guard works
        pull(private, tmp_path / "got", endpoint="http://192.0.2.1")
    closed = FakeHub()
    closed.server.server_close()  # a loopback port nobody listens on
    with pytest.raises(HubError, match=rf"cannot pull from {private}: the hub at {closed.url} did not answer"):
        pull(private, tmp_path / "got", endpoint=closed.url)
    _assert_nothing_left(tmp_path / "got")


# ---------------------------------------------------------------- CLI


def test_cli_push_pull_and_errors(hf, adapters, tmp_path, capsys):
    from prompt_cdm.cli import main

    shared = tmp_path / "shared" / "stars"
    assert main(["hub", "push", str(adapters["lora"]), str(shared)]) == 0
    assert main(["hub", "pull", str(shared), "--into", str(tmp_path / "a")]) == 0
    assert f"-> {tmp_path / 'a'} (checksums verified)" in capsys.readouterr().out

    repo = _repo()  # the hub: the `hf` fixture points HF_ENDPOINT's constants at the double
    assert main(["hub", "push", str(adapters["soft-prompt"]), repo, "--private", "--revision", "v1"]) == 0
    assert hf.repos[repo].private and CHECKSUMS_NAME in hf.files(repo, "v1")
    assert main(["hub", "pull", repo, "--revision", "v1", "--into", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / SOFT_PROMPT_DIFFUSERS_NAME).is_file()
    capsys.readouterr()

    assert main(["hub", "pull", repo, "--into", str(tmp_path / "b")]) == 2
    assert main(["hub", "push", str(tmp_path / "nothing"), repo]) == 2
    assert main(["hub", "pull", repo, "--revision", "v1", "--into", str(tmp_path / "c"),
                 "--backbone", str(tmp_path / "no-sd")]) == 2
    assert main(["hub", "pull", repo, "--into", str(tmp_path / "d")]) == 2  # main holds no adapter
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (tqdm bars aside)
    assert len(err) == 4 and all(line.startswith("prompt-cdm: error: ") for line in err)
    assert "exists and is not an empty folder" in err[0] and "is not a folder" in err[1]
    assert f"--backbone {tmp_path / 'no-sd'}: " in err[2]
    assert f"{repo} has no checksums.json: it was not pushed with `prompt-cdm hub push`" in err[3]
    _assert_nothing_left(tmp_path / "c")
    _assert_nothing_left(tmp_path / "d")
