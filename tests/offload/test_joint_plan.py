"""The joint plan of several models in one server (offload/joint.py), checked by invariants.

The two real shapes:
- Qwen3-Next-80B-A3B-Instruct Q4_K_M: offload/shape_fixture.py reproduces the published GGUF (48 layers, full
  attention in every 4th, 512 experts of which 10 are used, n_vocab 151936; 48,405,005,312 bytes of tensors).
- Qwen2.5-Coder-7B-Instruct Q4_K_M, built below the way the fixture builds shapes: the values of the model's
  config.json on Hugging Face (Qwen/Qwen2.5-Coder-7B-Instruct: num_hidden_layers 28, hidden_size 3584,
  num_attention_heads 28, num_key_value_heads 4, intermediate_size 18944, vocab_size 152064,
  max_position_embeddings 32768, tie_word_embeddings false, q/k/v projections with biases) and llama.cpp's
  Q4_K_M recipe (src/llama-quant.cpp: q6_K for output.weight and, on `use_more_bits` layers, attn_v and
  ffn_down; q4_K for the other matrices; norms and biases f32). Its tensors come to 4.68 GB, the size
  Hugging Face lists for Qwen2.5-Coder-7B-Instruct-Q4_K_M.gguf.

How many expert layers the 80B keeps on the GPU beside the 7B is the planner's decision and is not pinned.
What is asserted: every device and every member within its budget, the members' shares never overlap (their
budgets add up to at most the device's, their bytes to the device's total), no further layer or expert group
of any member fits in what the GPU has left, and a higher priority never costs a model GPU memory.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from offload.__main__ import main
from offload.gguf_shape import KvType, ModelShape, read_model_shape
from offload.hardware import GIB, CpuInfo, GpuInfo, HardwareProfile
from offload.joint import (
    JointMember,
    JointPlan,
    JointPlanner,
    LoadedModel,
    LoadVerdict,
    MemberPlan,
    plan_joint,
    plan_load,
)
from offload.planner import PlanError, PlanRequest, cuda_tensor_bytes, gpu_margin, plan, ram_margin
from offload.shape_fixture import F32, Q4_K, Q6_K, HeaderModel, TensorSpec, use_more_bits, write_header_only_gguf
from offload.table import render_joint_table

CTX = 32768
# config.json of Qwen2.5-Coder-7B-Instruct (see the module docstring)
CODER_LAYERS, CODER_EMBD, CODER_FF, CODER_HEADS, CODER_KV_HEADS, CODER_VOCAB = 28, 3584, 18944, 28, 4, 152064
# src/llama-kv-cache.cpp: one K and one V row of n_head_kv * head_dim values per layer and cell, f16 = 2 bytes
CODER_KV_F16_BYTES_PER_TOKEN = CODER_LAYERS * 2 * (CODER_KV_HEADS * CODER_EMBD // CODER_HEADS) * 2
CODER_PUBLISHED_BYTES = 4.68e9  # Hugging Face's size of Qwen2.5-Coder-7B-Instruct-Q4_K_M.gguf


def qwen25_coder_7b_q4_k_m() -> HeaderModel:
    head_dim = CODER_EMBD // CODER_HEADS
    kv_dim = head_dim * CODER_KV_HEADS
    tensors = [
        TensorSpec("token_embd.weight", (CODER_EMBD, CODER_VOCAB), Q4_K),
        TensorSpec("output_norm.weight", (CODER_EMBD,), F32),
        TensorSpec("output.weight", (CODER_EMBD, CODER_VOCAB), Q6_K),
    ]
    for il in range(CODER_LAYERS):
        blk = f"blk.{il}."
        more_bits = Q6_K if use_more_bits(il, CODER_LAYERS) else Q4_K
        tensors += [
            TensorSpec(blk + "attn_norm.weight", (CODER_EMBD,), F32),
            TensorSpec(blk + "attn_q.weight", (CODER_EMBD, CODER_EMBD), Q4_K),
            TensorSpec(blk + "attn_q.bias", (CODER_EMBD,), F32),
            TensorSpec(blk + "attn_k.weight", (CODER_EMBD, kv_dim), Q4_K),
            TensorSpec(blk + "attn_k.bias", (kv_dim,), F32),
            TensorSpec(blk + "attn_v.weight", (CODER_EMBD, kv_dim), more_bits),
            TensorSpec(blk + "attn_v.bias", (kv_dim,), F32),
            TensorSpec(blk + "attn_output.weight", (CODER_EMBD, CODER_EMBD), Q4_K),
            TensorSpec(blk + "ffn_norm.weight", (CODER_EMBD,), F32),
            TensorSpec(blk + "ffn_gate.weight", (CODER_EMBD, CODER_FF), Q4_K),
            TensorSpec(blk + "ffn_up.weight", (CODER_EMBD, CODER_FF), Q4_K),
            TensorSpec(blk + "ffn_down.weight", (CODER_FF, CODER_EMBD), more_bits),
        ]
    prefix = "qwen2."
    metadata: dict[str, int | float | str | list[int] | list[str]] = {
        prefix + "block_count": CODER_LAYERS,
        prefix + "context_length": 32768,
        prefix + "embedding_length": CODER_EMBD,
        prefix + "feed_forward_length": CODER_FF,
        prefix + "attention.head_count": CODER_HEADS,
        prefix + "attention.head_count_kv": CODER_KV_HEADS,
        prefix + "rope.freq_base": 1000000.0,
        prefix + "attention.layer_norm_rms_epsilon": 1e-6,
        "general.file_type": 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    }
    return HeaderModel("qwen2", "Qwen2.5-Coder-7B-Instruct (header only)", metadata, tuple(tensors), CODER_VOCAB)


def machine(gpus_gib: tuple[float, ...] = (16,), ram_gib: float = 120) -> HardwareProfile:
    """conftest's machine: a 16-core host with 80 GB/s RAM and 448 GB/s PCIe-4 GPUs (module-scoped here)."""
    gpus = tuple(GpuInfo(f"test GPU {i}", int(s * GIB), int(s * GIB), 448e9, 4, 16) for i, s in enumerate(gpus_gib))
    return HardwareProfile(
        gpus=gpus,
        cpu=CpuInfo("test CPU", 16, 32, frozenset({"avx2", "fma"})),
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=int(ram_gib * GIB),
        ram_bandwidth_bytes_per_s=80e9,
    )


@pytest.fixture(scope="module")
def coder_7b_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shapes") / "Qwen2.5-Coder-7B-Instruct-Q4_K_M.gguf"
    return write_header_only_gguf(qwen25_coder_7b_q4_k_m(), path)


@pytest.fixture(scope="module")
def coder_7b(coder_7b_gguf: Path) -> ModelShape:
    return read_model_shape(coder_7b_gguf)


@pytest.fixture(scope="module")
def gpu16() -> JointPlanner:
    """One planner for the 16 GiB GPU + 120 GiB machine: the tests below share its members' curves."""
    return JointPlanner(machine())


def members(big: ModelShape, coder: ModelShape, big_weight: float = 1.0, coder_weight: float = 1.0):
    return [
        JointMember(big, PlanRequest(ctx=CTX, model_name="qwen3-next"), big_weight),
        JointMember(coder, PlanRequest(ctx=CTX, model_name="coder"), coder_weight),
    ]


# ---------------------------------------------------------------------------------------------------------
# invariants


def assert_within_budgets(joint: JointPlan) -> None:
    for device in joint.devices:
        assert 0 <= device.used_bytes <= device.budget_bytes, device
        shares = [next((d for d in m.plan.devices if d.name == device.name), None) for m in joint.members]
        placed = [d for d, m in zip(shares, joint.members, strict=True) if d is not None and not m.kept]
        # every member within its own share, and the shares never overlap
        assert all(d.total_bytes <= d.budget_bytes for d in placed)
        assert sum(d.budget_bytes for d in placed) <= device.budget_bytes
        # the device's total is the members' bytes, each counted once
        assert device.used_bytes == sum(m.bytes_on(device.name) for m in joint.members)
        used = sum(d.total_bytes for d in shares if d is not None)
        reserved = sum(m.reserved_ram_bytes for m in joint.members) if device.kind == "cpu" else 0
        assert device.used_bytes == used + reserved


def next_expert_group_bytes(member: MemberPlan, shape: ModelShape) -> int | None:
    """GPU memory the smallest expert group still in RAM takes (CUDA-padded tensor bytes); None when every
    layer is on a GPU with its experts, or when whole layers are still in RAM (see below)."""
    result = member.plan
    if any(layer.device == "CPU" for layer in result.layers):
        return None
    experts_in_ram = [layer.index for layer in result.layers if layer.experts_device == "CPU"]
    if not experts_in_ram:
        return None
    return min(
        sum(cuda_tensor_bytes(t) for t in shape.tensors if t.layer == i and t.kind == "routed_experts")
        for i in experts_in_ram
    )


def assert_no_further_group_fits(
    joint: JointPlan, shapes: dict[str, ModelShape], hardware: HardwareProfile | None = None
) -> None:
    """No member's next expert group fits in what the GPUs have left (by its bytes). With `hardware`, also no
    member's next layer: what a layer adds depends on the compute buffer too, so the single-model planner is
    asked, on what the member uses plus everything left on the GPUs, and must place no more layers and no more
    expert groups there."""
    for device in joint.devices:
        if device.kind != "gpu":
            continue
        for member in joint.members:
            step = next_expert_group_bytes(member, shapes[member.name])
            if step is not None:
                assert device.free_bytes < step, (member.name, device.free_bytes, step)
    if hardware is None:
        return
    free = {d.name: d.free_bytes for d in joint.devices}
    for member in joint.members:
        result = member.plan
        used = {d.name: d.total_bytes for d in result.devices}
        request = PlanRequest(ctx=result.ctx, kv_type=result.kv_type, n_ubatch=result.n_ubatch, n_batch=result.n_batch)
        gpus = tuple(
            replace(gpu, free_bytes=used.get(f"CUDA{i}", 0) + free[f"CUDA{i}"] + gpu_margin(gpu.total_bytes, request))
            for i, gpu in enumerate(hardware.gpus)
        )
        ram = result.device("CPU").budget_bytes + ram_margin(hardware.ram_total_bytes)
        more = plan(shapes[member.name], replace(hardware, gpus=gpus, ram_available_bytes=ram), request)
        assert more.n_gpu_layers <= result.n_gpu_layers, member.name
        assert more.gpu_expert_layers <= result.gpu_expert_layers, member.name


# ---------------------------------------------------------------------------------------------------------
# the golden case: Qwen3-Next-80B-A3B + Qwen2.5-Coder-7B on a 16 GiB GPU and 120 GiB of RAM


def test_the_coder_shape_is_the_published_one(coder_7b: ModelShape) -> None:
    assert coder_7b.n_layer == CODER_LAYERS
    assert coder_7b.total_bytes == pytest.approx(CODER_PUBLISHED_BYTES, rel=0.01)
    assert coder_7b.kv_bytes_per_token(KvType.F16) == CODER_KV_F16_BYTES_PER_TOKEN


def test_a_single_member_gets_exactly_the_single_model_plan(
    gpu16: JointPlanner, qwen3next_80b: ModelShape, coder_7b: ModelShape
) -> None:
    for shape in (qwen3next_80b, coder_7b):
        request = PlanRequest(ctx=CTX)
        joint = gpu16.plan([JointMember(shape, request)])
        assert joint.fits
        assert joint.members[0].plan == plan(shape, machine(), request)
        assert_within_budgets(joint)
    # the module-level function is the same thing
    assert plan_joint([JointMember(coder_7b)], machine()).members[0].plan == plan(coder_7b, machine(), PlanRequest())


def test_80b_and_coder_share_the_gpu_within_budget_and_greedily(
    gpu16: JointPlanner, qwen3next_80b: ModelShape, coder_7b: ModelShape
) -> None:
    joint = gpu16.plan(members(qwen3next_80b, coder_7b))
    assert joint.fits and [m.name for m in joint.members] == ["qwen3-next", "coder"]
    assert_within_budgets(joint)
    assert_no_further_group_fits(joint, {"qwen3-next": qwen3next_80b, "coder": coder_7b}, machine())
    # the coder is wholly on the GPU, the 80B's expert layers are what the GPU is short of
    assert joint.member("coder").plan.n_gpu_layers == CODER_LAYERS + 1
    assert next_expert_group_bytes(joint.member("qwen3-next"), qwen3next_80b) is not None
    big, coder = joint.member("qwen3-next").plan, joint.member("coder").plan
    # both keep the context they would have alone; the GPU is shared, not the context
    assert (big.ctx, coder.ctx) == (CTX, CTX)
    assert sum(d.kv_bytes for d in coder.devices) == coder.n_ctx * CODER_KV_F16_BYTES_PER_TOKEN
    # both use the GPU, and the 80B is worse off than alone (it had the GPU to itself)
    assert joint.member("qwen3-next").gpu_bytes > 0 and joint.member("coder").gpu_bytes > 0
    alone = plan(qwen3next_80b, machine(), PlanRequest(ctx=CTX))
    assert big.gpu_expert_layers < alone.gpu_expert_layers
    assert big.predicted.decode_tokens_per_s <= alone.predicted.decode_tokens_per_s
    # the RAM left is split between the prompt caches, in proportion to the (equal) weights
    assert big.prompt_cache_bytes > 0 and coder.prompt_cache_bytes > 0
    assert "joint plan" in " ".join(big.tradeoffs)


@pytest.mark.parametrize("favoured", ["qwen3-next", "coder"])
def test_a_higher_priority_never_costs_gpu_memory(
    gpu16: JointPlanner, qwen3next_80b: ModelShape, coder_7b: ModelShape, favoured: str
) -> None:
    equal = gpu16.plan(members(qwen3next_80b, coder_7b))
    weights = (4.0, 1.0) if favoured == "qwen3-next" else (1.0, 4.0)
    weighted = gpu16.plan(members(qwen3next_80b, coder_7b, *weights))
    assert weighted.fits
    assert_within_budgets(weighted)
    assert_no_further_group_fits(weighted, {"qwen3-next": qwen3next_80b, "coder": coder_7b}, machine())
    assert weighted.member(favoured).gpu_bytes >= equal.member(favoured).gpu_bytes
    # and its share of the RAM left (the prompt cache) grows with its weight
    assert weighted.member(favoured).plan.prompt_cache_bytes > equal.member(favoured).plan.prompt_cache_bytes


def test_three_members(
    gpu16: JointPlanner, qwen3next_80b: ModelShape, coder_7b: ModelShape, dense_8b: ModelShape
) -> None:
    trio = [*members(qwen3next_80b, coder_7b), JointMember(dense_8b, PlanRequest(ctx=8192, model_name="llama-8b"))]
    joint = gpu16.plan(trio)
    assert joint.fits and len(joint.members) == 3
    assert_within_budgets(joint)
    shapes = {"qwen3-next": qwen3next_80b, "coder": coder_7b, "llama-8b": dense_8b}
    assert_no_further_group_fits(joint, shapes, machine())
    assert all(m.gpu_bytes > 0 for m in joint.members)


# ---------------------------------------------------------------------------------------------------------
# small cases


@pytest.mark.parametrize("gpus_gib", [(2,), (4,), (16, 24)], ids=["2GiB", "4GiB", "16GiB+24GiB"])
def test_small_and_several_gpus(qwen3next_80b: ModelShape, coder_7b: ModelShape, gpus_gib: tuple[float, ...]) -> None:
    hardware = machine(gpus_gib=gpus_gib)
    joint = plan_joint(members(qwen3next_80b, coder_7b), hardware)
    assert joint.fits
    assert [d.name for d in joint.devices] == [f"CUDA{i}" for i in range(len(gpus_gib))] + ["CPU"]
    assert_within_budgets(joint)
    assert_no_further_group_fits(joint, {"qwen3-next": qwen3next_80b, "coder": coder_7b}, hardware)
    # GPUs too small for both models whole: layers, not only experts, are shared
    assert any(layer.device == "CPU" for m in joint.members for layer in m.plan.layers)
    if gpus_gib == (2,):
        # too small for the 80B's GPU-side minimum beside the coder's layers: it runs on the CPU alone
        # (op_offload off, as plan() does when the GPUs cannot help), the coder keeps a few layers there
        big = joint.member("qwen3-next").plan
        assert big.n_gpu_layers == 0 and not big.op_offload and [d.name for d in big.devices] == ["CPU"]
        assert joint.member("coder").plan.n_gpu_layers > 0
    else:
        assert all(m.gpu_bytes > 0 for m in joint.members)


def test_cpu_only(qwen3next_80b: ModelShape, coder_7b: ModelShape) -> None:
    hardware = machine(gpus_gib=())
    joint = plan_joint(members(qwen3next_80b, coder_7b), hardware)
    assert joint.fits
    assert [d.name for d in joint.devices] == ["CPU"]
    assert_within_budgets(joint)
    for member in joint.members:
        assert [d.name for d in member.plan.devices] == ["CPU"] and member.plan.n_gpu_layers == 0


def test_a_model_that_can_never_fit_is_named_and_the_others_are_planned(
    qwen3next_80b: ModelShape, coder_7b: ModelShape
) -> None:
    joint = plan_joint(members(qwen3next_80b, coder_7b), machine(gpus_gib=(8,), ram_gib=24))
    assert not joint.fits
    assert [p.name for p in joint.problems] == ["qwen3-next"]
    assert joint.problems[0].never_fits and "does not fit even alone" in joint.problems[0].reason
    assert [m.name for m in joint.members] == ["coder"]
    assert_within_budgets(joint)


def two_80b(shape: ModelShape, first: str = "instruct", second: str = "thinking") -> list[JointMember]:
    return [JointMember(shape, PlanRequest(ctx=CTX, model_name=name)) for name in (first, second)]


def test_models_that_fit_alone_but_not_together(qwen3next_80b: ModelShape) -> None:
    # without a GPU each 80B needs its 45 GiB of weights in RAM: one fits in 80 GiB, two do not
    joint = plan_joint(two_80b(qwen3next_80b), machine(gpus_gib=(), ram_gib=80))
    assert not joint.fits
    assert [m.name for m in joint.members] == ["instruct"]  # admitted in order: the first keeps its place
    problem = joint.problems[0]
    assert problem.name == "thinking" and not problem.never_fits
    assert "does not fit beside instruct" in problem.reason and "RAM" in problem.reason
    assert_within_budgets(joint)


def test_bad_members_are_plan_errors(coder_7b: ModelShape) -> None:
    with pytest.raises(PlanError, match="weight"):
        JointMember(coder_7b, weight=0)
    with pytest.raises(PlanError, match="share the name"):
        plan_joint([JointMember(coder_7b), JointMember(coder_7b)], machine())


# ---------------------------------------------------------------------------------------------------------
# eviction


def loaded(planner: JointPlanner, member: JointMember, last_used: float, idle: bool) -> LoadedModel:
    current = planner.plan([member]).members[0].plan
    return LoadedModel(JointMember(member.shape, member.request, member.weight, current), last_used, idle)


def test_eviction_takes_the_least_recently_used_idle_model(qwen3next_80b: ModelShape, coder_7b: ModelShape) -> None:
    planner = JointPlanner(machine(gpus_gib=(), ram_gib=80))  # one 80B fits in its RAM, two do not
    instruct, thinking = two_80b(qwen3next_80b)
    coder = JointMember(coder_7b, PlanRequest(ctx=CTX, model_name="coder"))
    old = JointMember(coder_7b, PlanRequest(ctx=CTX, model_name="coder-old"))
    # loaded alone, instruct took the whole machine: nothing fits beside it until it goes
    state = [loaded(planner, instruct, 5.0, idle=True), loaded(planner, old, 1.0, idle=True)]
    decision = plan_load(state, thinking, planner.hardware, planner)
    assert decision.verdict == LoadVerdict.EVICT
    assert decision.evict == ("coder-old", "instruct")  # least recently used first, until it fits
    assert decision.plan.fits and [m.name for m in decision.plan.members] == ["thinking"]
    # a busy model is never evicted: evicting the idle one is not enough
    busy = [loaded(planner, instruct, 1.0, idle=False), loaded(planner, old, 5.0, idle=True)]
    decision = plan_load(busy, thinking, planner.hardware, planner)
    assert decision.verdict == LoadVerdict.CANNOT_FIT_NOW and decision.evict == ()
    assert "no idle model is left" in decision.reason
    # planned jointly rather than kept as loaded, the coder fits beside the 80B
    fresh = [LoadedModel(instruct, 1.0, idle=False)]
    decision = plan_load(fresh, coder, planner.hardware, planner)
    assert decision.verdict == LoadVerdict.FITS and decision.evict == ()
    assert_within_budgets(decision.plan)


def test_a_model_that_never_fits_is_not_worth_evicting_for(qwen3next_80b: ModelShape, coder_7b: ModelShape) -> None:
    planner = JointPlanner(machine(gpus_gib=(8,), ram_gib=24))
    coder = JointMember(coder_7b, PlanRequest(ctx=CTX, model_name="coder"))
    state = [loaded(planner, coder, 1.0, idle=True)]
    decision = plan_load(state, JointMember(qwen3next_80b, PlanRequest(ctx=CTX)), planner.hardware, planner)
    assert decision.verdict == LoadVerdict.NEVER_FITS and decision.evict == ()
    assert "does not fit even alone" in decision.reason


def test_a_kept_model_keeps_its_plan_and_memory(qwen3next_80b: ModelShape, coder_7b: ModelShape) -> None:
    planner = JointPlanner(machine())
    coder = JointMember(coder_7b, PlanRequest(ctx=8192, model_name="coder"))
    current = planner.plan([coder]).members[0].plan
    big = JointMember(qwen3next_80b, PlanRequest(ctx=CTX, model_name="qwen3-next"))
    joint = planner.plan([JointMember(coder_7b, coder.request, current=current), big])
    assert joint.fits
    assert joint.member("coder").kept and joint.member("coder").plan == current
    assert_within_budgets(joint)
    assert_no_further_group_fits(joint, {"qwen3-next": qwen3next_80b, "coder": coder_7b}, machine())


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_the_table_shows_models_and_devices(
    gpu16: JointPlanner, qwen3next_80b: ModelShape, coder_7b: ModelShape
) -> None:
    joint = gpu16.plan(members(qwen3next_80b, coder_7b))
    table = render_joint_table(joint, {"qwen3-next": qwen3next_80b, "coder": coder_7b})
    lines = table.splitlines()
    assert lines[0] == "joint plan of 2 models (all fit)"
    assert lines[2].split() == ["model", "weight", "CUDA0", "CPU"]
    for row in ("qwen3-next ", "coder ", "total ", "budget ", "free "):
        assert any(line.startswith(row) for line in lines), row
    assert "coder: n_gpu_layers 29 of 29" in table and "override: ^blk" in table


def test_cli_prints_the_joint_plan_as_json(
    qwen3next_80b_gguf: Path,
    coder_7b_gguf: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    machine_args = ["--gpu", "none", "--ram", "120GiB@80GB/s", "--cores", "16", "--ctx", str(CTX)]
    models = [str(qwen3next_80b_gguf), str(coder_7b_gguf)]
    status = main(["plan", *models, *machine_args, "--weight", "1", "--weight", "2", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    document = json.loads(out)
    assert document["fits"] is True and document["problems"] == []
    assert [m["weight"] for m in document["members"]] == [1.0, 2.0]
    for device in document["devices"]:
        assert device["used_bytes"] == sum(device["members"].values()) <= device["budget_bytes"]
    assert {"model_params", "context_params"} <= set(document["members"][0]["plan"]["llama_cpp"])
    assert document["hardware"]["gpus"] == []
    # a model that fits nowhere: the plan of the others is printed, status 1 and one line on stderr
    status = main(["plan", *models, "--gpu", "none", "--ram", "24GiB@80GB/s", "--ctx", str(CTX)])
    out, err = capsys.readouterr()
    assert status == 1 and "joint plan of 2 models (1 left out)" in out
    assert len(err.strip().splitlines()) == 1 and "does not fit even alone" in err


def test_cli_bad_weights_are_one_line(
    coder_7b_gguf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for extra in (["--weight", "2"], [str(coder_7b_gguf), "--weight", "1"]):
        status = main(["plan", str(coder_7b_gguf), *extra, "--gpu", "none", "--ram", "16GiB@80GB/s"])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and "--weight" in err
