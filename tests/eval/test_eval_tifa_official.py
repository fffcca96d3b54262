"""TIFA as the official code (github.com/Yushi-Hu/tifa, tifascore/) scores it: the official sample's
shipped mPLUG answers through `--backend answers` (0.8125), the official result shape, exact matching,
the official answer -> choice mapping, images from an id -> path JSON read in chunks, the prompted VLM
backends on tiny random models, and the bad-input lines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.errors import EvalError
from eval.tifa import ImageFiles, evaluate, find_images, load_questions, official_result, score
from eval.tifa_mapping import ChoiceMapper, agreement, get_mapper, official_parts
from eval.vqa import AnswersVQA, get_backend, read_answers
from prompt_cdm.cli import main

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "tifa_official"
ANSWERS = json.loads((DATA / "tifa_mapping" / "answers.json").read_text())["items"]
FAST_AGREEMENT = 327  # of 457: measured with all-MiniLM-L6-v2, docs/tifa.md
have_official = pytest.mark.skipif(official_parts() is None, reason="the tifa-official extra (all-mpnet-base-v2) "
                                   "is not installed")


@pytest.fixture(scope="module")
def fast():
    return get_mapper("fast")


def _err_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------- the official sample, end to end


def test_official_sample_through_answers_backend_is_0_8125(tmp_path, capsys):
    """The shipped mPLUG answers of the official sample, scored from the CLI: 0.8125, the official per-type
    figures, and RESULT.official.json equal to the official sample_evaluation_result.json."""
    out = tmp_path / "r.json"
    assert main(["eval", "tifa", "--questions", str(SAMPLE / "sample_question_answers.json"), "--backend", "answers",
                 "--answers", str(SAMPLE / "sample_evaluation_result.json"), "--mapping", "fast",
                 "--format", "official", "--out", str(out)]) == 0
    shipped = json.loads((SAMPLE / "sample_evaluation_result.json").read_text())
    res = json.loads(out.read_text())
    assert res["score"] == 0.8125 == shipped["tifa_average"]
    assert res["stdev"] == pytest.approx(shipped["tifa_stdev"], abs=1e-15)
    assert res["by_type"] == shipped["accuracy_by_type"]
    assert res["mapping"]["mapping"] == "fast" and res["answer_match"] == "exact" and res["backend"] == "answers"
    assert json.loads(out.with_suffix(".official.json").read_text()) == shipped
    assert "official:" in capsys.readouterr().out


def test_answers_from_a_jsonl_and_from_our_own_rows(tmp_path, fast):
    recs = load_questions(SAMPLE / "sample_question_answers.json").records
    shipped = json.loads((SAMPLE / "sample_evaluation_result.json").read_text())["question_details"]
    rows = [{"id": r["id"], "question": r["question"], "answer": shipped[r["id"]][r["question"]]["free_form_vqa"]}
            for r in recs]
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = evaluate(recs, None, AnswersVQA(p), fast)
    assert run.result["score"] == 0.8125 and run.result["missing_images"] == []
    ours = tmp_path / "ours.jsonl"  # our RESULT.jsonl: `answer` is the question file's, the model's is free_form_vqa
    ours.write_text("".join(json.dumps(r) + "\n" for r in run.rows))
    assert read_answers(ours) == read_answers(p) == read_answers(SAMPLE / "sample_evaluation_result.json")


def test_official_result_keeps_first_record_last_answer_and_counts_repeats():
    rows = [{"id": "a", "question": "q?", "answer": "yes", "element_type": "t", "free_form_vqa": "no",
             "multiple_choice_vqa": "no", "score": 0},
            {"id": "a", "question": "q?", "answer": "yes", "element_type": "t", "free_form_vqa": "yes",
             "multiple_choice_vqa": "yes", "score": 1},
            {"id": "b", "question": "r?", "answer": "2", "element_type": "u", "free_form_vqa": "2",
             "multiple_choice_vqa": "2", "score": 1}]
    off = official_result(rows)
    assert off["tifa_average"] == 0.75 and off["caption_scores"] == {"a": 0.5, "b": 1}
    assert off["question_details"]["a"]["q?"]["scores"] == 1 and off["accuracy_by_type"] == {"t": 0.5, "u": 1}
    assert off["tifa_stdev"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert official_result(rows[:1])["tifa_stdev"] is None  # one caption: the official code would raise


# ---------------------------------------------------------------- exactness


def test_correctness_is_exact_string_equality_unless_normalised():
    recs = [{"id": "a", "caption": "c", "question": "q", "choices": ["yes", "no"], "answer": "yes",
             "element_type": "t"}]
    assert score(recs, ["Yes"])["score"] == 0.0 and score(recs, [" yes"])["score"] == 0.0
    assert score(recs, ["Yes"], normalise=True)["score"] == 1.0


class _Spy(ChoiceMapper):
    """A mapper that records what it embeds (and embeds nothing: every text is [1, 0])."""

    def __init__(self, normalise=False):
        self.normalise, self.seen = normalise, []

    def embed(self, texts):
        import torch

        self.seen.append(list(texts))
        return torch.tensor([[1.0, 0.0]] * len(texts))


def test_exact_precheck_as_official_and_choices_embedded_as_one_batch():
    spy = _Spy()
    assert spy.map(["yes", "Yes", " no"], [["yes", "no"]] * 3) == ["yes", "yes", "yes"]
    assert spy.seen == [["yes", "no"], ["Yes"], ["yes", "no"], [" no"]]  # official: `answer not in choices`
    spy = _Spy(normalise=True)
    assert spy.map(["Yes", " no"], [["yes", "no"]] * 2) == ["yes", "no"] and spy.seen == []


# ---------------------------------------------------------------- the answer -> choice mapping


def test_fast_mapping_agreement_with_the_official_choices_is_as_documented(fast):
    """The checked-in answers carry the choice the official code picks (make_answers.py, all-mpnet-base-v2);
    all-MiniLM-L6-v2 agrees on FAST_AGREEMENT of them (docs/tifa.md)."""
    assert len(ANSWERS) == 457 and all(a["official"] in a["choices"] for a in ANSWERS)
    n, misses = agreement(fast, ANSWERS)
    assert n == FAST_AGREEMENT and len(misses) == len(ANSWERS) - n
    assert fast("not really", ["yes", "no"]) == "no"  # the official mapping says yes


@have_official
def test_official_mapping_equals_the_official_choices_on_a_sample():
    items = ANSWERS[::10]
    m = get_mapper("official")
    assert m.name == "official" and Path(m.model_path).name == "all-mpnet-base-v2"
    assert m.map([a["answer"] for a in items], [a["choices"] for a in items]) == [a["official"] for a in items]


@pytest.mark.slow
@have_official
def test_official_mapping_equals_the_official_choices_on_all_answers():
    assert agreement(get_mapper("official"), ANSWERS) == (len(ANSWERS), [])


def test_official_mapping_missing_or_unknown_is_one_line(monkeypatch):
    import eval.tifa_mapping as tm

    monkeypatch.setattr(tm, "official_parts", lambda: None)
    assert tm.default_mapping() == "fast"
    with pytest.raises(EvalError, match=r"pip install 'prompt-cdm\[tifa-official\]', or use --mapping fast"):
        get_mapper("official")
    with pytest.raises(EvalError, match="unknown answer mapping 'mpnet'; valid: official, fast"):
        get_mapper("mpnet")


def test_split_zip_reader_reads_across_parts(tmp_path):
    import io
    import zipfile

    from eval.tifa_mapping import _Concatenated

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/a.txt", "x" * 5000)
        z.writestr("m/b.txt", "hello")
    data = buf.getvalue()
    parts = []
    for k, s in enumerate(range(0, len(data), 777)):
        parts.append(tmp_path / f"p.{k:03d}")
        parts[-1].write_bytes(data[s: s + 777])
    with zipfile.ZipFile(io.BufferedReader(_Concatenated(parts), 100)) as z:
        assert z.read("m/b.txt") == b"hello" and z.read("m/a.txt") == b"x" * 5000


# ---------------------------------------------------------------- images: id -> path JSON, read in chunks


def _im(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def test_images_from_an_id_to_path_json(tmp_path):
    (tmp_path / "sub").mkdir()
    _im().save(tmp_path / "sub" / "x.jpg")
    _im(1).save(tmp_path / "abs.png")
    table = tmp_path / "imgs.json"
    table.write_text(json.dumps({"a": "sub/x.jpg", "b": str(tmp_path / "abs.png"), "c": "gone.png"}))
    found, missing = find_images(table, ["a", "b", "c", "d"])
    assert found == {"a": tmp_path / "sub" / "x.jpg", "b": tmp_path / "abs.png"} and missing == ["c", "d"]
    table.write_text("[1]")
    with pytest.raises(EvalError, match="must be a JSON object"):
        find_images(table, ["a"])


def test_evaluate_reads_each_image_once_and_holds_one_chunk(tmp_path):
    paths = {}
    for k in range(10):
        paths[str(k)] = tmp_path / f"{k}.png"
        _im(k).save(paths[str(k)])
    reads = []

    class Counting(ImageFiles):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    class Echo(AnswersVQA):
        name, free_form, needs_images = "echo", False, True
        calls: list = []

        def __init__(self):
            pass

        def unanswerable(self, record):
            return None

        def answer(self, images, records):
            self.calls.append(len({id(im) for im in images}))
            return [r["answer"] for r in records]

    recs = [{"id": str(k % 10), "caption": "c", "question": f"q{k}", "choices": ["yes", "no"], "answer": "yes",
             "element_type": "t"} for k in range(30)]
    run = evaluate(recs, Counting(paths), Echo(), chunk=4)
    assert sorted(reads) == sorted(paths) and Echo.calls == [4, 4, 2]  # 10 images in chunks of 4, each read once
    assert [r["question"] for r in run.rows] == [r["question"] for r in recs] and run.result["score"] == 1.0


# ---------------------------------------------------------------- prompted VLM backends (tiny random models)


def _tok():
    import transformers as tf

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
        "what color is the a circle square how many are ? yes no red green blue answer question choices : , "
        "multiple-choice . user assistant").split()
    tok = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, model_input_names=["input_ids",
                                                                                             "attention_mask"])
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def _tiny_vlm(kind: str, folder: Path) -> Path:
    """A randomly initialised tiny BLIP-2 / InstructBLIP / LLaVA and its processor, saved to `folder`."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tok = _tok()
    V, image = len(tok), tok.convert_tokens_to_ids("<image>")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    vision = dict(image_size=32, patch_size=16, **small)
    opt = tf.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, ffn_dim=37, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2,
                       eos_token_id=3).to_dict()
    qformer = dict(vocab_size=V, max_position_embeddings=40, encoder_hidden_size=32, **small)
    blip_images = tf.BlipImageProcessor(size={"height": 32, "width": 32})
    if kind == "blip-2":
        model = tf.Blip2ForConditionalGeneration(tf.Blip2Config(
            vision_config=vision, qformer_config=qformer, text_config=opt, num_query_tokens=4, image_token_index=image))
        proc = tf.Blip2Processor(blip_images, tok, num_query_tokens=4)
    elif kind == "instructblip":
        model = tf.InstructBlipForConditionalGeneration(tf.InstructBlipConfig(
            vision_config=vision, qformer_config=qformer, text_config=opt, num_query_tokens=4, image_token_index=image))
        proc = tf.InstructBlipProcessor(image_processor=blip_images, tokenizer=tok, qformer_tokenizer=tok,
                                        num_query_tokens=4)
    else:
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(projection_dim=16, **vision).to_dict(), image_token_index=image,
            text_config=tf.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, intermediate_size=37,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                       pad_token_id=0, bos_token_id=2, eos_token_id=3).to_dict(),
            vision_feature_layer=-1))
        template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                    "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
        proc = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(size={"shortest_edge": 32},
                                                                       crop_size={"height": 32, "width": 32}),
                                 tokenizer=tok, chat_template=template, patch_size=16, image_token="<image>",
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["blip-2", "instructblip", "llava"])
def test_prompted_vlm_backends_tiny_random_models(kind, tmp_path, fast, monkeypatch):
    from eval import vqa_hf

    folder = _tiny_vlm(kind, tmp_path / kind)
    backend = get_backend("transformers", model=str(folder), max_length=4)
    assert backend.kind == kind and backend.batch_size == 1 and backend._answer is vqa_hf._prompted
    prompts = []
    real = vqa_hf.choice_prompt
    monkeypatch.setattr(vqa_hf, "choice_prompt", lambda q, c: prompts.append(real(q, c)) or prompts[-1])
    recs = [{"id": "x", "caption": "c", "question": "what color is the circle?", "choices": ["red", "green"],
             "answer": "red", "element_type": "color"},
            {"id": "y", "caption": "d", "question": "is there a square?", "choices": ["yes", "no"], "answer": "yes",
             "element_type": "object"}]
    run = evaluate(recs, {"x": _im(0), "y": _im(1)}, backend, fast)
    assert len(run.rows) == 2 and all(r["multiple_choice_vqa"] in r["choices"] for r in run.rows)
    assert prompts[0] == ("Answer the multiple-choice question. Question: what color is the circle? Choices: red, "
                          "green Answer:")  # the official BLIP-2 prompt
    one = [backend.answer([_im(k)], [r])[0] for k, r in enumerate(recs)]
    assert one == [r["free_form_vqa"] for r in run.rows]  # deterministic, one question per call


def test_transformers_backend_defaults_are_the_official_loop(tmp_path):
    from test_eval_tifa import _tiny_hf_vqa

    backend = get_backend("transformers", model=str(_tiny_hf_vqa("blip", tmp_path / "blip")))
    assert backend.batch_size == 1 and backend.length() == {"max_length": 50}
    ims, recs = [_im(0), _im(1)], [{"question": "what color is the circle?"}, {"question": "how many are there?"}]
    assert backend.answer(ims, recs) == [backend.answer([im], [r])[0] for im, r in zip(ims, recs)]


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_cli_answers_for_another_question_file_one_line_partial_result(tmp_path, capsys):
    recs = json.loads((SAMPLE / "sample_question_answers.json").read_text())
    rows = [{"id": r["id"], "question": r["question"], "answer": "yes"} for r in recs if r["id"] == "coco_301091"]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert main(["eval", "tifa", "--questions", str(SAMPLE / "sample_question_answers.json"), "--backend", "answers",
                 "--answers", str(a), "--mapping", "fast", "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert "8 question(s) unanswerable (not in the answers file" in line and "drawbench_52" in line  # its 8
    res = json.loads(out.read_text())
    assert res["n_questions"] == 11 and res["n_captions"] == 1  # the partial result is written


def test_cli_text_inputs_file_as_questions_and_unknown_names(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    ans = str(SAMPLE / "sample_evaluation_result.json")
    assert main(["eval", "tifa", "--questions", str(SAMPLE / "sample_text_inputs.json"), "--backend", "answers",
                 "--answers", ans, "--out", out]) == 2
    assert "is a TIFA text-inputs file (2 captions, no questions)" in _err_line(capsys)
    q = str(SAMPLE / "sample_question_answers.json")
    assert main(["eval", "tifa", "--questions", q, "--backend", "answers", "--answers", ans, "--mapping", "mpnet",
                 "--out", out]) == 2
    assert "unknown answer mapping 'mpnet'" in _err_line(capsys)
    assert main(["eval", "tifa", "--questions", q, "--backend", "answers", "--out", out]) == 2
    assert "needs --answers FILE" in _err_line(capsys)
    assert main(["eval", "tifa", "--questions", q, "--backend", "answers", "--answers", str(tmp_path / "no.json"),
                 "--out", out]) == 2
    assert "answers file" in _err_line(capsys)
    assert main(["eval", "tifa", "--questions", q, "--backend", "oracle", "--out", out]) == 2
    assert "give --images DIR" in _err_line(capsys)


def test_cli_missing_images_from_an_id_to_path_json(tmp_path, capsys):
    _im().save(tmp_path / "coco.png")
    table = tmp_path / "imgs.json"
    table.write_text(json.dumps({"coco_301091": "coco.png"}))
    out = tmp_path / "r.json"
    assert main(["eval", "tifa", "--questions", str(SAMPLE / "sample_question_answers.json"), "--images", str(table),
                 "--backend", "answers", "--answers", str(SAMPLE / "sample_evaluation_result.json"), "--mapping",
                 "fast", "--out", str(out)]) == 2
    assert "no image for 1 caption id(s): drawbench_52" in _err_line(capsys)
    assert json.loads(out.read_text())["score"] == 1.0  # coco_301091 alone
