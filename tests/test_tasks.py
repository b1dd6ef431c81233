"""`llmquant eval --tasks`: the local task loaders against the shared data's files, the prompts lm-eval
renders from them, scores equal to lm-eval called directly, a packed checkpoint equal to its
fake-quant twin, and the errors.

Tiny random models (conftest); few documents per task (`limit`). lm-eval is the `tasks` extra.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import byte_tokenizer, gptq3_records, tiny_model
from llmquant.cli import app
from llmquant.data.tasks import LAYOUTS, find_local_task
from llmquant.errors import UserError
from llmquant.evaluate import EvalSettings, TaskSettings, run_eval
from llmquant.evaluate.tasks import INSTALL_HINT, build_task, parse_task_list
from llmquant.formats import save_fake, save_packed

lm_eval = pytest.importorskip("lm_eval", reason="the tasks extra: pip install -e '.[tasks]'")

LIMIT = 6


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in lines(path)]


# ---------------------------------------------------------------- the local loaders


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_local_loader_yields_every_document_with_the_fields_lm_eval_reads(task, shared_data):
    local = find_local_task(task, shared_data)
    assert local is not None and local.split == LAYOUTS[task].split
    for path in local.files:
        assert len(local.docs) == len(lines(path)), path
    for doc in local.docs:
        assert set(LAYOUTS[task].fields) <= set(doc)
    if "choices" in LAYOUTS[task].fields:  # ARC, OpenBookQA: the hub's {"text": [...], "label": [...]}
        assert all(d["answerKey"].lstrip() in d["choices"]["label"] for d in local.docs)
        assert all(len(d["choices"]["text"]) == len(d["choices"]["label"]) >= 3 for d in local.docs)
    if task in ("piqa", "boolq"):
        assert {d["label"] for d in local.docs} == {0, 1}
    if task == "winogrande":
        assert {d["answer"] for d in local.docs} == {"1", "2"} and all(d["sentence"].count("_") == 1 for d in local.docs)


def test_the_two_boolq_files_give_the_same_documents(shared_data, tmp_path):
    """val.jsonl (SuperGLUE, what lm-eval reads) and dev.jsonl (Google's release, mapped): identical prompts."""
    superglue = find_local_task("boolq", shared_data)
    (tmp_path / "tasks" / "boolq").mkdir(parents=True)
    (tmp_path / "tasks" / "boolq" / "dev.jsonl").symlink_to(shared_data / "tasks" / "boolq" / "dev.jsonl")
    google = find_local_task("boolq", tmp_path)
    assert google.files[0].name == "dev.jsonl" and superglue.files[0].name == "val.jsonl"
    strip = lambda docs: [(d["question"], d["passage"], d["label"]) for d in docs]  # noqa: E731
    assert strip(google.docs) == strip(superglue.docs)


def test_no_local_data_means_none(tmp_path):
    assert find_local_task("piqa", tmp_path) is None and find_local_task("hellaswag", tmp_path) is None


def expected_prompts(task: str, root: Path) -> list[tuple]:
    """(text, choices, target) per document, from the upstream files and lm-eval's YAML as written
    down in the shared data's README (hub field -> file field), independent of the loaders."""
    t = root / "tasks"
    if task == "piqa":
        labels = [int(x) for x in lines(t / "piqa/valid-labels.lst")]
        return [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], y) for r, y in zip(raw(t / "piqa/valid.jsonl"), labels)]
    if task in ("arc_easy", "arc_challenge"):
        name = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl"}[task]
        return [
            (
                f"Question: {r['question']['stem']}\nAnswer:",
                [c["text"] for c in r["question"]["choices"]],
                [c["label"] for c in r["question"]["choices"]].index(r["answerKey"]),
            )
            for r in raw(t / name)
        ]
    if task == "winogrande":
        out = []
        for r in raw(t / "winogrande/dev.jsonl"):
            i = r["sentence"].index("_")
            out.append(({"1": 0, "2": 1}[r["answer"]], [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]], r["sentence"][i + 1 :].strip()))
        return out
    if task == "boolq":
        return [(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["label"])) for r in raw(t / "boolq/val.jsonl")]
    if task == "lambada_openai":
        return [(r["text"].rsplit(" ", 1)[0], None, " " + r["text"].rsplit(" ", 1)[1]) for r in raw(t / "lambada_openai/lambada_test.jsonl")]
    if task == "openbookqa":
        return [
            (r["question"]["stem"], [c["text"] for c in r["question"]["choices"]], [c["label"] for c in r["question"]["choices"]].index(r["answerKey"]))
            for r in raw(t / "openbookqa/test.jsonl")
        ]
    raise ValueError(task)


def interesting(task: str, docs: list[dict]) -> list[int]:
    """The first documents, plus ARC's digit labels and 3/5-choice items."""
    picks = [0, 1, 2, len(docs) - 1]
    if "choices" in docs[0]:
        picks += [i for i, d in enumerate(docs) if len(d["choices"]["label"]) != 4][:2]
        picks += [i for i, d in enumerate(docs) if d["choices"]["label"][0].isdigit()][:2]
    return picks


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_lm_eval_renders_the_local_documents_as_the_readme_says(task, shared_data):
    local = find_local_task(task, shared_data)
    built = build_task(task, local)
    docs = list(built.eval_docs)
    assert len(docs) == len(local.docs)
    expected = expected_prompts(task, shared_data)
    for i in interesting(task, local.docs):
        text, choices, target = expected[i]
        assert built.doc_to_text(docs[i]) == text, (task, i)
        assert built.doc_to_target(docs[i]) == target, (task, i)
        if choices is not None:
            assert built.doc_to_choice(docs[i]) == choices, (task, i)


# ---------------------------------------------------------------- scores


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    """The conftest tiny LLaMA, every decoder linear GPTQ 3-bit: packed and fake-quant."""
    model = tiny_model("llama")
    records = gptq3_records(model)
    dirs = tmp_path_factory.mktemp("packed"), tmp_path_factory.mktemp("fake")
    save_packed(model, records, dirs[0], {"method": "gptq"})
    save_fake(model, records, dirs[1], {"method": "gptq"})
    for d in dirs:
        byte_tokenizer().save_pretrained(d)
    return dirs


HUB_FILES = {  # task -> (split, hub-shaped rows from the upstream file), written by the test itself
    "piqa": "validation",
    "arc_easy": "test",
    "winogrande": "validation",
    "lambada_openai": "test",
}


def hub_shaped(task: str, root: Path) -> list[dict]:
    t = root / "tasks"
    if task == "piqa":
        labels = lines(t / "piqa/valid-labels.lst")
        return [{**r, "label": int(y)} for r, y in zip(raw(t / "piqa/valid.jsonl"), labels)]
    if task == "arc_easy":
        return [
            {"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]], "label": [c["label"] for c in r["question"]["choices"]]}}
            for r in raw(t / "arc_easy/ARC-Easy-Test.jsonl")
        ]
    if task == "winogrande":
        return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in raw(t / "winogrande/dev.jsonl")]
    return raw(t / "lambada_openai/lambada_test.jsonl")


def lm_eval_directly(model_dir: Path, task: str, shared_data: Path, tmp_path: Path) -> dict:
    """lm-eval's own route for local data: its task YAML with `dataset_path: json` and data_files."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split = HUB_FILES[task]
    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in hub_shaped(task, shared_data)[:LIMIT]))
    root = Path(lm_eval.__file__).parent / "tasks"
    yaml_path = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "winogrande": "winogrande/default.yaml",
                 "lambada_openai": "lambada/lambada_openai.yaml"}[task]
    config = load_yaml(root / yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    config.update(
        dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(data)}},
        training_split=None, validation_split=split if split == "validation" else None,
        test_split=split if split == "test" else None,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=[config], limit=LIMIT, bootstrap_iters=1000, log_samples=False,
                                  task_manager=TaskManager(include_defaults=False, include_path=[str(tmp_path)]))
    return out["results"][task]


def test_tasks_give_lm_evals_own_numbers(tiny_llama_dir, shared_data, tmp_path, one_thread):
    tasks = tuple(HUB_FILES)
    report = run_eval(str(tiny_llama_dir), EvalSettings(datasets=(), tasks=tasks, limit=LIMIT, batch_size=2, data_dir=str(shared_data)))
    assert report["results"] == [] and [e["task"] for e in report["tasks"]] == list(tasks)
    for entry in report["tasks"]:
        direct = lm_eval_directly(tiny_llama_dir, entry["task"], shared_data, tmp_path)
        assert entry["items"] == entry["n_samples"] == LIMIT and entry["split"] == HUB_FILES[entry["task"]]
        assert entry["scores"], entry
        for metric, score in entry["scores"].items():
            assert score["value"] == direct[f"{metric},none"], (entry["task"], metric)
            if metric.startswith("acc"):
                assert score["stderr"] == direct[f"{metric}_stderr,none"], (entry["task"], metric)


def test_a_packed_checkpoint_scores_as_its_fake_quant_twin(twins, shared_data, one_thread):
    packed, fake = twins
    settings = EvalSettings(datasets=(), tasks=("arc_easy",), limit=LIMIT, batch_size=2, data_dir=str(shared_data))
    a, b = run_eval(str(packed), settings), run_eval(str(fake), settings)
    assert a["backend"] is not None and b["backend"] is None  # the packed one ran through QuantizedLinear
    assert [e["scores"] for e in a["tasks"]] == [e["scores"] for e in b["tasks"]]


# ---------------------------------------------------------------- the command line


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_prints_the_protocol_then_the_score_and_combines_with_ppl(twins, shared_data, text_file):
    packed, _ = twins
    done = cli("eval", "--model", str(packed), "--tasks", "piqa", "--ppl", str(text_file), "--seqlen", "64", "--max-windows", "2",
               "--limit", "4", "--data-dir", str(shared_data), "--quiet")  # fmt: skip
    assert done.exit_code == 0, done.output
    sha = find_local_task("piqa", shared_data).sha256
    protocol = next(line for line in done.output.splitlines() if line.startswith("task piqa:"))
    assert "split validation, 4 items (--limit 4 of 1838)" in protocol and "0-shot" in protocol and "metric acc, acc_norm" in protocol
    assert sha[0][:16] in protocol and sha[1][:16] in protocol
    assert any(re.match(r"piqa: acc [01]\.\d{4} ± 0\.\d{4}, acc_norm [01]\.\d{4} ± ", line) for line in done.output.splitlines()), done.output
    assert any(line.endswith(f"{text_file}: ppl") or f"{text_file}: ppl " in line for line in done.output.splitlines())


def test_json_has_everything(twins, shared_data):
    entry = run_eval(str(twins[1]), EvalSettings(datasets=(), tasks=("piqa",), limit=3, data_dir=str(shared_data)))["tasks"][0]
    assert entry["data_sha256"] == list(find_local_task("piqa", shared_data).sha256) and entry["items"] == entry["n_samples"] == 3
    assert entry["documents"] == 1838 and entry["split"] == "validation" and entry["num_fewshot"] == 0 and entry["limit"] == 3
    assert entry["metrics"] == ["acc", "acc_norm"] and entry["lm_eval_version"] == lm_eval.__version__ and entry["seconds"] > 0
    assert all(0 <= s["value"] <= 1 and s["stderr"] >= 0 for s in entry["scores"].values())
    json.dumps(entry)  # JSON-able as is


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "piqa_nope"], "unknown task 'piqa_nope' (did you mean piqa?); available with local data: arc_challenge"),
        (["--tasks", "piqa", "--limit", "0"], "--limit: must be positive"),
        (["--tasks", "piqa", "--num-fewshot", "5"], "few-shot examples come from its training split"),
        (["--limit", "5"], "apply to --tasks only"),
    ],
)
def test_cli_errors_are_one_line_before_loading(tiny_llama_dir, shared_data, args, message):
    done = cli("eval", "--model", str(tiny_llama_dir), "--data-dir", str(shared_data), "--quiet", *args)
    assert isinstance(done.exception, UserError) and message in str(done.exception)  # main() prints it as one line, exit 2


def test_missing_lm_eval_says_how_to_install(tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    done = cli("eval", "--model", str(tiny_llama_dir), "--tasks", "piqa", "--quiet")
    assert isinstance(done.exception, UserError) and str(done.exception) == INSTALL_HINT


def test_missing_local_data_without_the_hub_names_the_expected_path(tiny_llama_dir, tmp_path, monkeypatch):
    import datasets

    def offline(*_args, **_kwargs):
        raise ConnectionError("the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=rf"piqa: no local data \(expected {tmp_path}/piqa/valid.jsonl, {tmp_path}/piqa/valid-labels.lst;"):
        run_eval(str(tiny_llama_dir), EvalSettings(datasets=(), tasks=("piqa",), limit=2, data_dir=str(tmp_path)))


def test_task_lists():
    assert parse_task_list(["piqa,arc_easy", "piqa", " boolq "]) == ("piqa", "arc_easy", "boolq")
    assert len(parse_task_list(["default"])) == 7
    with pytest.raises(UserError, match="--batch-size"):
        TaskSettings(("piqa",), batch_size=0).check()
