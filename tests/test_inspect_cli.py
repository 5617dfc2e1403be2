"""`lmforge inspect ANALYSIS`: its help, one-line refusals of bad input (exit 2), and real runs on a tiny model
with SmolLM2's tokenizer that write PNG, JSON and HTML and print their paths; the files hold the analysis'
own numbers. Runs of an analysis whose module is not importable are skipped."""

import importlib.util
import json

import pytest
import torch
from conftest import assert_rel_close
from helpers.inspect_by_hand import attribute_by_hand
from helpers.serving import tiny_chat_llm

import lmforge
from lmforge.cli import main
from lmforge.commands.inspect import ANALYSES
from lmforge.inspect.run import ANALYSES as RUN_ANALYSES

TEXT = "The capital of France is"


def _one_error_line(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge inspect: error: "), err
    assert expected in err[0], err[0]


def test_the_command_is_listed_and_every_analysis_has_help(capsys):
    assert ANALYSES == RUN_ANALYSES
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "inspect" in capsys.readouterr().out
    for analysis in ANALYSES:
        with pytest.raises(SystemExit) as e:
            main(["inspect", analysis, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0
        for word in (*ANALYSES, "--model", "--text", "--out", "--layer", "--head", "--target", "--steps",
                     "--method", "--baseline", "--task", "--k", "--metric", "--attribution"):
            assert word in out, (analysis, word)


def test_bad_input_gets_one_line_and_exit_2(capsys, tmp_path):
    cases = [
        (["bogus", "--text", "x"], "unknown analysis 'bogus'; one of attention, rollout"),
        (["lens"], "needs a non-empty --text"),
        (["lens", "--text", "   "], "needs a non-empty --text"),
        (["attribute", "--text", "x", "--attribution", "shap"], "unknown --attribution 'shap'"),
        (["lens", "--text", "x", "--k", "0"], "--k and --steps must be at least 1"),
        (["heads", "--data", str(tmp_path / "missing.txt")], "no such file"),
        (["attention", "--model", "preset:tiny-llama", "--text", "hi", "--layer", "2"],
         "layer 2 is out of range: the model has 2 layers (0..1)"),
        (["attention", "--model", "preset:tiny-llama", "--text", "hi", "--head", "-5"],
         "head -5 is out of range: each layer has 4 heads (0..3)"),
        (["lens", "--model", str(tmp_path / "nowhere"), "--text", "hi"], "nowhere"),
    ]
    for argv, expected in cases:
        _one_error_line(capsys, ["inspect", *argv, "--out", str(tmp_path / "out")], expected)
    assert not (tmp_path / "out").exists()  # nothing written for refused input


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_chat_llm().save(folder)
    return folder


def _run(capsys, model_dir, out, *argv) -> dict:
    assert main(["inspect", *argv, "--model", str(model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    name = printed[-1].rsplit("/", 1)[-1].removesuffix(".html")
    assert printed == [str(out / f"{name}{s}") for s in (".png", ".json", ".html")]
    for p in printed:
        assert (out / p.rsplit("/", 1)[-1]).stat().st_size > 100
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("attribution", ["gradient_x_input", "saliency"])
def test_attribute_writes_the_attribution_of_the_model(capsys, tmp_path, model_dir, monkeypatch, attribution):
    data = _run(capsys, model_dir, tmp_path, "attribute", "--text", TEXT, "--attribution", attribution,
                "--target", " Paris")
    llm = lmforge.load(str(model_dir))
    ref = attribute_by_hand(llm, TEXT, target=" Paris", method=attribution)
    assert data["tokens"] == ref.tokens and data["target_id"] == ref.target_id
    assert_rel_close(torch.tensor(data["scores"]), ref.scores, rtol=1e-4)


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in this tree yet")


@pytest.mark.slow
def test_lens_attention_rollout_heads_probe_write_their_files(capsys, tmp_path, model_dir):
    _needs("lmforge.inspect.lens")
    llm = lmforge.load(str(model_dir))
    from lmforge.inspect.lens import logit_lens

    data = _run(capsys, model_dir, tmp_path, "lens", "--text", TEXT, "--target", " Paris", "--k", "3")
    ref = logit_lens(llm, TEXT, k=3, target=" Paris")
    assert data["tokens"] == ref.tokens and data["top_tokens"] == ref.top_tokens
    assert_rel_close(torch.tensor(data["top_probs"]), ref.top_probs)
    data = _run(capsys, model_dir, tmp_path, "attention", "--text", TEXT, "--layer", "1", "--head", "0")
    trace = llm.inspect(TEXT, capture=("attention",))
    assert_rel_close(torch.tensor(data["attention"][0][0]), trace.attention[1][0, 0])
    data = _run(capsys, model_dir, tmp_path, "rollout", "--text", TEXT)
    from lmforge.inspect.attention import rollout

    assert_rel_close(torch.tensor(data["attention"][0][0]), rollout(trace))
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("To be, or not to be.\nAll the world's a stage.\n")
    data = _run(capsys, model_dir, tmp_path, "heads", "--data", str(sentences))
    assert torch.tensor(data["scores"]).shape == (llm.config.n_layer, llm.config.n_head)
    _needs("lmforge.inspect.probes")
    data = _run(capsys, model_dir, tmp_path, "probe", "--task", "verse_vs_prose", "--limit", "40")
    assert len(data["accuracy"]) == llm.config.n_layer + 1
