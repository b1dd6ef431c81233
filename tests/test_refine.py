"""The refinement engine (llmquant/core/refine.py) and every layout's learnables (layouts/*/refine.py):
gradients reach every learned parameter, exported records decode exactly and pack exactly, the
reconstruction loss never increases, and a refined run end to end per layout is deterministic,
resumable and gives a packed checkpoint equal to its fake-quant one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from layout_cases import build
from llmquant import layouts
from llmquant.core.refine import RefineConfig, reconstruction_loss, refine_layer
from llmquant.errors import UserError
from llmquant.formats import packers
from llmquant.layouts.refine import learnable
from llmquant.quantize import run_quantize
from llmquant.recipe import load_recipe, parse_recipe
from llmquant.runtime import load_quantized
from test_reliability import Crash, assert_same_checkpoint, crash_after

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, COLS = 24, 80
CONFIG = RefineConfig()

# A record of each layout (and variant) with every part present in every (row, group).
CASES = {
    "uniform": "uniform-2bit",
    "uniform-g_idx": "uniform-4bit-g_idx",
    "uniform-sym": "uniform-3bit-sym",
    "mixed": "mixed-1to4",
    "partial_binary": "partial_binary-8bit-0.3",
    "binary_residual": "binary_residual",
    # `refine.codes: keep`: the method's codes and zeros kept, the scales of 2..8-bit groups learned
    "uniform-keep": "uniform-2bit",
    "uniform-g_idx-keep": "uniform-4bit-g_idx",
    "uniform-sym-keep": "uniform-3bit-sym",
    "mixed-keep": "mixed-1to4",
}
KEEP = RefineConfig(codes="keep")


def case_config(case: str) -> RefineConfig:
    return KEEP if case.endswith("-keep") else CONFIG


def case_record(case: str, seed: int = 0):
    name = CASES[case]
    layout, tensors, meta, _, _ = build(name, ROWS, COLS, seed)
    if layout == "binary_residual":
        # Salient columns in every block, concentrated and sparse entries in every (row, block).
        g = torch.Generator().manual_seed(seed)
        tensors["salient_columns"] = torch.arange(COLS) % 4 == 0
        salient = tensors["salient_columns"].unsqueeze(0).expand(ROWS, COLS)
        tensors["sparse_mask"] = (torch.arange(COLS) % 4 == 1).unsqueeze(0).expand(ROWS, COLS).clone()
        tensors["signs2"] = (torch.rand(ROWS, COLS, generator=g) < 0.5) & salient
        tensors["params"] = (torch.rand(tensors["params"].shape, generator=g) * 0.1 + 0.01).half()
    if layout == "mixed":
        tensors["scales"] = tensors["scales"].float().clamp(min=0.01).half()  # no zero 1-bit scale
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    return layouts.make_record(layout, tensors, meta), weight


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_reach_every_learned_parameter(case):
    record, weight = case_record(case)
    learned = learnable(record, weight, case_config(case))
    assert learned is not None
    target = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(7)) * 0.05
    (learned.weight() - target).pow(2).sum().backward()
    params = [*learned.clip_params, *learned.scale_params]
    assert params
    if case == "mixed":
        multi = (record.tensors["group_bits"] > 1).unsqueeze(0).expand(ROWS, -1)
        assert bool(multi.any()) and bool((~multi).any())
        for p in learned.clip_params:  # clipping logits of the 2..4-bit groups
            assert bool((p.grad[multi] != 0).all())
        for p in learned.scale_params:  # alpha/mu offsets of the 1-bit groups
            assert bool((p.grad[~multi] != 0).all())
    elif case == "mixed-keep":
        multi = (record.tensors["group_bits"] > 1).unsqueeze(0).expand(ROWS, -1)
        assert not learned.clip_params
        scale_offset, mean_offset = learned.scale_params
        assert bool((scale_offset.grad != 0).all())  # every group's scale (1-bit: alpha)
        assert bool((mean_offset.grad[~multi] != 0).all())  # mu of the 1-bit groups
    else:
        for p in params:
            assert p.grad is not None and bool((p.grad != 0).all()), case


@pytest.mark.parametrize("case", ["partial_binary", "binary_residual", "mixed", *[c for c in CASES if c.endswith("-keep")]])
def test_binary_and_kept_code_parameters_start_at_the_record(case):
    record, weight = case_record(case)
    learned = learnable(record, weight, case_config(case))
    with torch.no_grad():
        start = learned.weight()
    if case == "mixed":  # the 1-bit groups' columns; the others are re-derived by the clipping
        cols = (record.tensors["group_bits"] == 1).repeat_interleave(record.meta["group_size"])[:COLS]
        assert torch.equal(start[:, cols], record.dequantized[:, cols])
    else:
        assert torch.equal(start, record.dequantized)


@pytest.mark.parametrize("case", sorted(CASES))
def test_refined_records_are_exact_records_of_their_layout(case):
    record, weight = case_record(case)
    learned = learnable(record, weight, case_config(case))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*learned.clip_params, *learned.scale_params]:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        forward = learned.weight()
    refined = learned.export()
    assert refined.layout == record.layout
    layouts.check_tensors(refined.layout, refined.tensors, refined.meta, ROWS, COLS)
    assert torch.equal(refined.dequantized, forward)  # the decode is what training saw
    assert not torch.equal(refined.dequantized, record.dequantized)
    packed = packers.pack(refined.layout, refined.tensors, refined.meta)
    unpacked = packers.unpack(packed)
    for key, tensor in refined.tensors.items():
        assert torch.equal(unpacked[key], tensor), key
    assert torch.equal(packers.dequantize(packed), refined.dequantized)  # packed == fake
    assert refined.bits == record.bits
    if case.endswith("-keep"):  # only the scales moved
        assert torch.equal(refined.tensors["codes"], record.tensors["codes"])
        assert torch.equal(refined.tensors["zeros"][multi_groups(record)], record.tensors["zeros"][multi_groups(record)])


def multi_groups(record) -> torch.Tensor:
    """Mask of a record's zeros that are integer zero points (all of them but the 1-bit groups' mu)."""
    if record.layout == "mixed":
        return (record.tensors["group_bits"] > 1).unsqueeze(0).expand(ROWS, -1)
    return torch.ones_like(record.tensors["zeros"], dtype=torch.bool)


# ---- the engine on a real decoder layer --------------------------------------------------------


def tiny_layer_setup(method_record):
    from conftest import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", layers=1)
    layer = model.model.layers[0]
    inputs = torch.randn(4, 16, 64)
    position = torch.arange(16).unsqueeze(0)
    kwargs = {"position_embeddings": model.model.rotary_emb(inputs, position)}
    with torch.no_grad():
        targets = layer(inputs, **kwargs)
    returns_tuple = isinstance(targets, tuple)
    targets = targets[0] if returns_tuple else targets
    names = ["self_attn.q_proj", "mlp.down_proj"]
    fp = {n: layer.get_submodule(n).weight.detach().clone() for n in names}
    records = {n: method_record(fp[n]) for n in names}
    with torch.no_grad():
        for n, r in records.items():
            layer.get_submodule(n).weight.copy_(r.dequantized)
    return layer, records, fp, inputs, targets, kwargs, returns_tuple


def rtn_record(weight):
    from llmquant.methods import get_method_class

    cls = get_method_class("rtn")
    return cls(cls.Config(name="rtn", bits=2, group_size=32)).quantize("x", weight.clone(), None)


@pytest.mark.parametrize(("lr", "codes"), [(1e-2, "rederive"), (10.0, "rederive"), (1e-2, "keep"), (10.0, "keep")])
def test_the_reconstruction_loss_never_increases(lr, codes):
    layer, records, fp, inputs, targets, kwargs, returns_tuple = tiny_layer_setup(rtn_record)
    before = {n: layer.get_submodule(n).weight.detach().clone() for n in records}
    config = RefineConfig(epochs=3, lr=lr, scale_lr=lr, codes=codes)
    seen = []
    result = refine_layer(
        layer, records, fp, inputs, targets, kwargs, returns_tuple, config, learnable, on_epoch=lambda *a: seen.append(a)
    )
    assert [s[0] for s in seen] == list(range(1, len(result.epoch_losses) + 1))
    assert result.loss_after <= result.loss_before
    assert result.loss_after == min([result.loss_before, *result.epoch_losses])
    kept = {n: (result.records[n] if n in result.records else records[n]).dequantized for n in records}
    assert reconstruction_loss(layer, kept, inputs, targets, kwargs, returns_tuple) == result.loss_after
    if lr == 1e-2:
        assert result.best_epoch > 0 and result.loss_after < result.loss_before
    for n in records:  # the layer's own weights are untouched (the runner installs the records)
        assert torch.equal(layer.get_submodule(n).weight, before[n])
    assert all(p.requires_grad for p in layer.parameters())  # frozen for training only


def test_zero_epochs_keep_the_records():
    layer, records, fp, inputs, targets, kwargs, returns_tuple = tiny_layer_setup(rtn_record)
    result = refine_layer(layer, records, fp, inputs, targets, kwargs, returns_tuple, RefineConfig(epochs=0), learnable)
    assert result.records == {} and result.loss_after == result.loss_before


# ---- end to end ----------------------------------------------------------------------------------

METHODS = {
    "gptq": {"bits": 2, "group_size": 16},  # uniform
    "slim": {"bits": 2, "group_size": 16},  # mixed
    "pbllm": {},  # partial_binary
    "billm": {"blocksize": 32},  # binary_residual
}
LAYOUT = {"gptq": "uniform", "slim": "mixed", "pbllm": "partial_binary", "billm": "binary_residual"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("refine") / "corpus.txt"
    path.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(400)))
    return path


def refined_recipe(model_dir, corpus, output, method, epochs=2, **refine):
    return parse_recipe(
        {
            "model": str(model_dir),
            "calibration": {"dataset": str(corpus), "nsamples": 3, "seqlen": 32, "seed": 1},
            "method": {"name": method, **METHODS[method]},
            "output": str(output),
            "refine": {"epochs": epochs, **refine},
        }
    )


@pytest.mark.parametrize(("method", "codes"), [*[(m, "rederive") for m in sorted(METHODS)], ("gptq", "keep"), ("slim", "keep")])
def test_a_refined_run_per_layout_end_to_end(tiny_llama_dir, corpus, tmp_path, method, codes):
    epochs_seen = []
    packed_dir, fake_dir = tmp_path / "packed", tmp_path / "fake"
    settings = {"lr": 5e-2, "scale_lr": 1e-2, "codes": codes}
    _, report = run_quantize(
        refined_recipe(tiny_llama_dir, corpus, packed_dir, method, **settings),
        on_refine_epoch=lambda *a: epochs_seen.append(a),
    )
    assert [(i, e) for i, e, _, _ in epochs_seen] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    stats = [linear["stats"]["refine"] for layer in report["layers"] for linear in layer["linears"]]
    assert all(s["loss_after"] <= s["loss_before"] and s["epochs"] == 2 for s in stats)
    assert report["recipe"]["refine"]["epochs"] == 2
    summary = report["refine"]
    assert summary["layers"] == 2 and summary["mean_loss_after"] <= summary["mean_loss_before"]
    # the packed checkpoint decodes to exactly the fake-quant checkpoint's weights
    if codes == "keep":  # the scales were learned: some linear's record was replaced
        assert any(s["refined"] for s in stats)
    run_quantize(refined_recipe(tiny_llama_dir, corpus, fake_dir, method, **settings), fmt="fake")
    fake = load_file(fake_dir / "model.safetensors")
    model = load_quantized(packed_dir)
    checked = 0
    for layer in report["layers"]:
        for linear in layer["linears"]:
            module = model.get_submodule(linear["name"])
            assert module.layout == LAYOUT[method]
            assert torch.equal(module.dequantize(), fake[linear["name"] + ".weight"].float())
            checked += 1
    assert checked == 14


def test_refined_runs_are_deterministic_and_resume_to_the_same_bytes(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    first, second, resumed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_quantize(refined_recipe(tiny_llama_dir, corpus, first, "gptq"))
    run_quantize(refined_recipe(tiny_llama_dir, corpus, second, "gptq"))
    assert_same_checkpoint(first, second)
    with monkeypatch.context() as patch:
        crash_after(patch, 0)
        with pytest.raises(Crash):
            run_quantize(refined_recipe(tiny_llama_dir, corpus, resumed, "gptq"))
    _, report = run_quantize(refined_recipe(tiny_llama_dir, corpus, resumed, "gptq"), resume=True)
    assert report["resumed_layers"] == 1
    assert_same_checkpoint(first, resumed)


def test_a_data_free_method_with_refine_is_calibrated(tiny_llama_dir, corpus, tmp_path):
    recipe = parse_recipe(
        {
            "model": str(tiny_llama_dir),
            "calibration": {"dataset": str(corpus), "nsamples": 3, "seqlen": 32, "seed": 1},
            "method": {"name": "rtn", "bits": 2, "group_size": 16},
            "output": str(tmp_path / "out"),
            "refine": {"epochs": 1},
        }
    )
    _, report = run_quantize(recipe)
    assert report["calibration"]["nsamples"] == 3
    assert all("refine" in linear["stats"] for layer in report["layers"] for linear in layer["linears"])


# ---- recipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("refine: {epochs: -1}", "refine.epochs"),
        ("refine: {lr: 0}", "refine.lr"),
        ("refine: {epoch: 2}", "refine.epoch: unknown key"),
        ("refine: {batch_size: 0}", "refine.batch_size"),
        ("refine: {codes: frozen}", "refine.codes"),
    ],
)
def test_bad_refine_blocks_name_the_field(tmp_path, tiny_llama_dir, block, field):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny_llama_dir}\nmethod: {{name: gptq, bits: 3}}\noutput: {tmp_path / 'o'}\n{block}\n")
    with pytest.raises(UserError) as error:
        load_recipe(path)
    assert field in str(error.value)


def test_recipes_without_refine_keep_their_settings(tmp_path, tiny_llama_dir):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny_llama_dir}\nmethod: {{name: gptq, bits: 3}}\noutput: {tmp_path / 'o'}\n")
    assert "refine" not in load_recipe(path).settings()
    assert json.dumps(load_recipe(path).settings())  # still plain JSON


def test_the_fused_group_fake_quant_matches_the_plain_straight_through_graph():
    from llmquant.core.refine import ClippedGrid

    g = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 70, generator=g) * 0.05
    size, groups = 16, 5  # the last group is cut: 70 = 4 * 16 + 6
    col_group = torch.arange(70) // size
    maxq = torch.tensor([3.0, 7.0, 1.0, 15.0, 3.0])
    grads = []
    for fused in (size, None):
        grid = ClippedGrid(weight, col_group, groups, maxq, False, 1.5, fused)
        with torch.no_grad():
            grid.up.add_(torch.randn(grid.up.shape, generator=torch.Generator().manual_seed(1)))
            grid.low.add_(torch.randn(grid.low.shape, generator=torch.Generator().manual_seed(2)))
        q, codes, _, _ = grid.quantize()
        (q * torch.linspace(-1, 1, 70)).sum().backward()
        grads.append((q.detach(), codes, grid.up.grad.clone(), grid.low.grad.clone()))
    (q1, c1, u1, l1), (q2, c2, u2, l2) = grads
    assert torch.equal(q1, q2) and torch.equal(c1, c2)
    torch.testing.assert_close(u1, u2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)


def test_windows_limits_refinement_to_the_first_windows():
    layer, records, fp, inputs, targets, kwargs, returns_tuple = tiny_layer_setup(rtn_record)
    config = RefineConfig(epochs=1, windows=2)
    result = refine_layer(layer, records, fp, inputs, targets, kwargs, returns_tuple, config, learnable)
    current = {n: r.dequantized for n, r in records.items()}
    assert result.loss_before == reconstruction_loss(layer, current, inputs[:2], targets[:2], kwargs, returns_tuple)


def test_the_cli_shows_the_refinement_epochs(tiny_llama_dir, corpus, tmp_path):
    from test_cli import llmquant

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\n"
        f"calibration: {{dataset: {corpus}, nsamples: 2, seqlen: 32, seed: 0}}\n"
        "method: {name: pbllm}\n"
        f"output: {tmp_path / 'out'}\n"
        "refine: {epochs: 2}\n"
    )
    done = llmquant("quantize", "--recipe", str(recipe), "--json")
    assert done.returncode == 0, done.stderr
    assert "refinement epoch 2/2" in done.stderr and "refining" in done.stderr
    assert json.loads(done.stdout)["refine"]["layers"] == 2
