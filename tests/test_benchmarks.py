"""benchmarks/budget_curve.sh (the issue-16 driver) and budget_table.py, without a GPU: the table on
fake case files, the driver's dry run, and one real run of the driver against fake tools and a fake
nvidia-smi (so the ballast / sampler / record / bundle plumbing is exercised before it costs GPU time)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import budget_table  # noqa: E402


def case(tool, method, budget, tok=None, smi=None, losses=None, status="ok", epoch=100.0, **kw):
    rec = dict(case=f"{tool}:{method}:{'none' if budget is None else budget}", tool=tool, method=method,
               budget_gib=budget, status=status, tokens_per_s=tok, smi_peak_gib=smi,
               peak_mem_gib=kw.pop("torch", None), finished_epoch=epoch, gpu_name="Fake H200",
               fits=None if budget is None or smi is None or status != "ok" else smi <= budget,
               steps=kw.pop("steps", 10))
    if losses is not None:
        rec["losses"] = losses
    rec.update(kw)
    return rec


def write_cases(d):
    loose = [
        case("llamaft", "lora", 16, 11000.0, 15.2, [12.5, 12.6, 12.7, 12.8, 12.9, 13.0], torch=13.0,
             device_peak_gib=15.0),
        case("llamaft", "lora", 18, 12000.0, 17.5, torch=15.1),
        case("llamaft", "lora", 40, 14000.0, 39.0),
        case("llamaft", "lora", None, 15000.0, 120.0),
        case("plain", "lora", None, 5700.0, 50.0, [12.5, 12.6005, 12.7, 12.8]),
        case("seed", "lora", None, 3000.0, 25.3),
        case("llamaft", "qlora", None, 10000.0, 9.0),
    ]
    for rec in loose:
        (d / (rec["case"].replace(":", "_") + ".json")).write_text(json.dumps(rec))
    (d / "bench_result_without_case.json").write_text(json.dumps({"tokens_per_s": 1.0}))  # not a case: ignored
    packed = [
        case("llamaft", "qlora", 7.5, status="failed", reason="out of memory", smi=7.4),
        case("unsloth", "lora", None, 7500.0, 17.5),
        case("llamaft", "lora", 16, 999.0, 15.0, epoch=50.0),  # an older run of a case: superseded
    ]
    with tarfile.open(d / "budget_cases_gpu1_x.tgz", "w:gz") as tar:
        for rec in packed:
            data = json.dumps(rec).encode()
            info = tarfile.TarInfo(rec["case"].replace(":", "_") + ".json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_budget_table_rows_targets_loss_parity_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_cases(tmp_path)
    assert budget_table.main([str(tmp_path)]) == 0
    md = (tmp_path / "budget_table.md").read_text()
    assert md == capsys.readouterr().out
    # rows, grouped by method; the newer of two runs of llamaft:lora:16; the failed case with its reason
    assert "| llamaft | 16 | 11,000 | 13.00 | 15.20 | 15.00 | yes | 1.47× | 3.67× | 5.0e-04 (vs plain, 4 steps) |" in md
    assert "| llamaft | 7.5 | failed (out of memory) | — | 7.40 | — | — |" in md
    assert "| unsloth | none | 7,500 |" in md and "| seed | none | 3,000 |" in md
    assert md.index("## LoRA") < md.index("| llamaft | 16 |") < md.index("## QLoRA") < md.index("| llamaft | 7.5 |")
    assert "999" not in md and "budget_cases_gpu1_x.tgz:llamaft_lora_16.json" in md  # superseded, named
    # targets: best llamaft run whose device peak is within the budget
    assert "| LoRA ≤18 GiB device: ≥10,500 tok/s, ≥1.5× Unsloth | llamaft:lora:18 | 12,000 | 17.50 | 1.60× | ✅ met |" in md
    assert "| LoRA ≤40 GiB device: ≥13,000 tok/s | llamaft:lora:40 | 14,000 |" in md
    assert "❌ missed (15,000 < 16,000 tok/s)" in md
    assert "❌ missed (no llamaft run within 7.5 GiB)" in md
    summary = json.loads((tmp_path / "budget_table.json").read_text())
    status = {t["target"]: t["status"] for t in summary["targets"]}
    assert list(status.values()) == ["met", "met", "missed", "missed", "no data"]
    row = next(r for r in summary["rows"] if r["case"] == "llamaft:lora:16")
    assert row["max_abs_dloss"] == pytest.approx(5e-4) and row["loss_steps"] == 4 and row["loss_reference"] == "plain"
    assert (tmp_path / "budget_table.png").stat().st_size > 10_000


def test_loss_parity_needs_the_same_workload():
    """A plain run of another step count trained other batches (the workload's rows set the order):
    the seed recipe of the same step count is the reference then, or none."""
    bt = budget_table
    ours = case("llamaft", "full", 46, 8000.0, 44.0, [12.5, 12.6], steps=10)
    plain4 = case("plain", "full", None, 5000.0, 90.0, [12.9, 12.9], steps=4)
    seed10 = case("seed", "full", None, 3800.0, 61.0, [12.5, 12.602], steps=10)
    assert bt.parity_reference([ours, plain4, seed10], ours) is seed10
    assert bt.parity_reference([ours, plain4], ours) is None


def test_budget_target_wants_the_unsloth_ratio_too():
    cases = [case("llamaft", "qlora", 7.5, 9600.0, 7.2), case("unsloth", "qlora", None, 6100.0, 7.9)]
    qlora = budget_table.TARGETS[3]
    res = budget_table.evaluate_target(qlora, cases)
    assert res["status"] == "missed" and res["why"] == "1.57× < 1.6× Unsloth"
    assert budget_table.evaluate_target(qlora, cases[:1])["status"] == "unknown"  # no Unsloth run


def run_curve(args, env=None, cwd=ROOT):
    return subprocess.run(["bash", "benchmarks/budget_curve.sh", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_budget_curve_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "budget_curve.sh")], check=True)
    subprocess.run(["bash", "-n", str(BENCH / "run_w512.sh")], check=True)
    subprocess.run(["bash", "-n", str(BENCH / "long_context.sh")], check=True)
    subprocess.run(["bash", "-n", str(BENCH / "budget_curve_all.sh")], check=True)


@pytest.mark.parametrize("gpus", [1, 2, 3])
def test_budget_curve_all_runs_every_default_case_once_over_the_gpus(tmp_path, gpus):
    """One command for the whole curve: each default case exactly once, each method's comparison on one card."""
    p = subprocess.run(["bash", "benchmarks/budget_curve_all.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", "NGPU": str(gpus), "STAGE": str(tmp_path)})
    out = p.stdout
    cases = [line.split()[-1] for line in out.splitlines() if line.startswith("# case ")]
    assert len(cases) == len(set(cases)) == 23
    assert {f"CUDA_VISIBLE_DEVICES={i}" for i in range(gpus)} <= set(out.split())
    assert f"CUDA_VISIBLE_DEVICES={gpus}" not in out.split()


def test_budget_curve_dry_run_prints_the_commands(tmp_path):
    p = run_curve(["llamaft:lora:16", "unsloth:qlora:none"],
                  dict(DRY_RUN="1", GPU="1", STAGE=str(tmp_path / "s"), OUT=str(tmp_path / "o")))
    assert p.returncode == 0, p.stderr
    out, s = p.stdout, tmp_path / "s"
    assert "CUDA_VISIBLE_DEVICES=1" in out
    assert f"python3 .bench/ballast.py 16 {s}/llamaft_lora_16.ready &" in out
    assert f"nvidia-smi -i 1 --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > {s}/llamaft_lora_16.smi.txt" in out
    assert f"python3 benchmarks/bench.py /tmp/llama31_8b_random lora 512 8 4 10 {s}/llamaft_lora_16.json\n" in out
    assert "--memory-gib" not in out
    assert f"python3 .bench/unsloth_bench.py /tmp/llama31_8b_random qlora 512 8 4 10 {s}/unsloth_qlora_none.json" in out
    assert "python3 .bench/save_tok.py /tmp/llama31_8b_random" in out
    assert out.count("ballast.py") == 1  # none: no ballast
    assert f"python3 benchmarks/budget_table.py {tmp_path / 'o'}" in out
    assert not (tmp_path / "o").exists() and not s.exists()  # a dry run writes nothing


def test_budget_curve_case_lists(tmp_path):
    env = dict(DRY_RUN="1", STAGE=str(tmp_path))
    everything = run_curve([], env).stdout
    assert everything.count("# case ") == 23
    assert "--variant plain" in everything and " full 512 8 4 10 " in everything  # plain: same steps, same batches
    picked = run_curve(["llamaft:qlora:*"], env).stdout
    assert [ln.split()[-1] for ln in picked.splitlines() if ln.startswith("# case")] == [
        "llamaft:qlora:7.5", "llamaft:qlora:8", "llamaft:qlora:12", "llamaft:qlora:none"]
    twice = run_curve(["llamaft:*:none", "*:lora:none"], env).stdout  # llamaft:lora:none once
    assert twice.count("# case ") == 6 and twice.count("# case llamaft:lora:none") == 1
    for bad in ("llamaft:lora:16GiB", "vllm:lora:none", "llamaft:dpo:none", "x:*"):
        p = run_curve([bad], env)
        assert p.returncode == 2 and "budget_curve:" in p.stderr


# ---- one real run of the driver on fake tools: ballast, sampler, timeout, record, bundle, table
FAKE_SMI = """#!/bin/bash
case "$*" in
  *-lms*) while :; do cat "$FAKE_SMI_STATE"; sleep 0.05; done ;;
  *driver_version*) printf 'name, memory.total [MiB], driver_version\\nFake H200, 143771 MiB, 1\\n' ;;
  *name,memory.total*) echo "Fake H200, 143771" ;;
  *) cat "$FAKE_SMI_STATE" ;;
esac
"""
FAKE_BALLAST = """import os, signal, sys, time
S = os.environ["FAKE_SMI_STATE"]; idle = open(S).read()
if float(sys.argv[1]) > 1000:
    sys.exit("RuntimeError: no card that large")
open(S, "w").write("100000\\n")  # holds all but BUDGET GiB
def bye(*_):
    open(S, "w").write(idle); sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("ballast holds 97.2 GiB; free 16.00 of 140.0 GiB", flush=True)
open(sys.argv[2], "w").write(str(int(float(sys.argv[1]) * 2**30)) + "\\n")
while True: time.sleep(1)
"""
FAKE_TOOL = """import json, os, sys, time
S = os.environ["FAKE_SMI_STATE"]; a = sys.argv[1:]
if a[0] == "save":
    os.makedirs(a[1]); open(os.path.join(a[1], "config.json"), "w").write("{}"); sys.exit()
if a[0] == "run":
    print("Traceback ...\\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"); sys.exit(1)
before, smi = open(S).read(), a[6].replace(".json", ".smi.txt")
open(S, "w").write(str(int(before) + 15000) + "\\n")
for _ in range(100):  # "allocated" until the driver's sampler has seen it
    time.sleep(0.02)
    if str(int(before) + 15000) in open(smi).read():
        break
open(S, "w").write(before)
json.dump(dict(tokens_per_s=12345.6, peak_mem_gib=13.1, losses=[12.5, 12.6], command="python x"), open(a[6], "w"))
"""


def test_budget_curve_runs_cases_against_fake_tools(tmp_path):
    repo, bin_ = tmp_path / "repo", tmp_path / "bin"
    for d in (repo / "benchmarks", repo / ".bench", bin_):
        d.mkdir(parents=True)
    for f in ("budget_curve.sh", "_prelude.sh", "budget_record.py", "budget_table.py"):
        shutil.copy(BENCH / f, repo / "benchmarks" / f)
    (repo / "benchmarks/bench.py").write_text(FAKE_TOOL)
    (repo / ".bench/seed_baseline.py").write_text(FAKE_TOOL)
    (repo / ".bench/ballast.py").write_text(FAKE_BALLAST)
    (bin_ / "nvidia-smi").write_text(FAKE_SMI)
    (bin_ / "nvidia-smi").chmod(0o755)
    (bin_ / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_ / "python3").chmod(0o755)
    # the plot is the table test's; hiding matplotlib here (the driver puts src/ on PYTHONPATH) keeps this fast
    (repo / "src").mkdir()
    (repo / "src/matplotlib.py").write_text("raise ImportError('hidden by the test')\n")
    state = tmp_path / "smi_state"
    state.write_text("500\n")
    out = tmp_path / "out"
    env = dict(PATH=f"{bin_}:{os.environ['PATH']}", FAKE_SMI_STATE=str(state), OUT=str(out), STAGE=str(tmp_path / "st"),
               M=str(tmp_path / "model"), PRELUDE_LOCK=str(tmp_path / "lock"), GPU="0", STEPS="2", MPLBACKEND="Agg")
    p = run_curve(["llamaft:lora:16", "seed:qlora:none", "llamaft:full:2000"], env, cwd=repo)
    assert p.returncode == 0, p.stdout + p.stderr
    (tgz,) = out.glob("budget_cases_gpu0_*.tgz")
    with tarfile.open(tgz) as tar:
        names = set(tar.getnames())
        recs = {n: json.load(tar.extractfile(n)) for n in names if n.endswith(".json")}
    assert {"llamaft_lora_16.smi.txt", "seed_qlora_none.log.txt"} <= names
    ok, failed = recs["llamaft_lora_16.json"], recs["seed_qlora_none.json"]
    assert ok["status"] == "ok" and ok["tokens_per_s"] == 12345.6 and ok["budget_gib"] == 16.0
    assert ok["smi_baseline_mib"] == 100000 and ok["smi_idle_mib"] == 500
    assert ok["smi_peak_gib"] == pytest.approx(15000 / 1024, abs=0.01) and ok["fits"] is True
    assert ok["ballast_free_gib"] == 16.0 and ok["gpu_name"] == "Fake H200" and ok["exit_code"] == 0
    assert ok["command"].endswith(f"bench.py {tmp_path}/model lora 512 8 4 2 {tmp_path}/st/llamaft_lora_16.json")
    assert ok["tool_command"] == "python x"
    assert failed["status"] == "failed" and failed["reason"] == "out of memory" and failed["exit_code"] == 1
    assert failed["fits"] is None and "CUDA out of memory" in failed["log_tail"][-1]
    nocard = recs["llamaft_full_2000.json"]
    assert nocard["status"] == "failed" and nocard["reason"] == "ballast not ready (RuntimeError: no card that large)"
    assert state.read_text() == "500\n"  # the ballast was stopped (it gives its memory back on SIGTERM)
    log = (out / "budget_log_gpu0.txt").read_text()
    assert "llamaft:lora:16      ok      12,346 tok/s  torch 13.10 GiB  device 14.65 GiB (budget 16, fits yes)" in log
    assert "seed:qlora:none      failed (out of memory)" in log
    assert "    torch.OutOfMemoryError: CUDA out of memory." in log  # a failed case's last log lines
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [tgz.name, "budget_log_gpu0.txt", "budget_table.md", "budget_table.json"])
    assert "| llamaft | 16 | 12,346 |" in (out / "budget_table.md").read_text()
    assert "no matplotlib here, plot skipped" in log


def test_bench_profile_sorts_kernels_by_kind():
    import bench

    kinds = {n: bench.kernel_kind(n) for n in (
        "nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_TNT", "flash_fwd_kernel<Flash_fwd_kernel_traits>",
        "triton_per_fused_mul_rsqrt_0", "Memcpy HtoD (Pinned -> Device)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
        "void at::native::reduce_kernel<512, 1>", "void multi_tensor_apply_kernel<adam>", "ncclKernel_AllReduce_Sum_bf16",
        "void indexSelectLargeIndex<c10::BFloat16>")}
    assert list(kinds.values()) == ["gemm", "attention", "triton", "copy", "elementwise", "reduce", "optimizer", "comm", "other"]
    assert bench.parse_args(["d", "lora", "512", "8", "4", "3", "o.json", "--profile"]).profile is True


def test_trace_gaps_blames_idle_gpu_time(tmp_path):
    """A synthetic step: compute kernels with three gaps -- one where the host sat in a synchronize, one
    where the next kernel was launched late (host behind), one where it was queued early but waited for
    a host copy on another stream -- and copies half hidden behind compute."""
    import gzip

    import trace_gaps

    def gpu(name, ts, dur, corr, cat="kernel"):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, args=dict(correlation=corr, stream=7))

    def rt(name, ts, dur, corr=None, tid=1):
        return dict(ph="X", cat="cuda_runtime", name=name, ts=ts, dur=dur, tid=tid, args=dict(correlation=corr))

    def op(name, ts, dur, tid=1):
        return dict(ph="X", cat="cpu_op", name=name, ts=ts, dur=dur, tid=tid)

    events = [
        op("aten::mm", 0, 5), rt("cudaLaunchKernel", 1, 2, corr=1), gpu("gemm_a", 10, 100, 1),
        # gap 110..210: the host sits in a synchronize
        op("aten::item", 100, 120), rt("cudaStreamSynchronize", 105, 110),
        op("aten::add", 195, 20), op("aten::mul", 200, 10), rt("cudaLaunchKernel", 202, 3, corr=2),
        gpu("add_b", 210, 50, 2),
        # gap 260..300: launched at 290 from aten::silu (host behind)
        op("aten::silu", 285, 10), rt("cudaLaunchKernel", 290, 2, corr=3), gpu("silu_c", 300, 100, 3),
        # gap 400..500: queued at 230, waits for the copy 420..500 (80 us exposed), and a copy 320..380 under silu_c
        op("record_stream_wait", 225, 10), rt("cudaLaunchKernel", 230, 2, corr=4), gpu("gemm_d", 500, 100, 4),
        gpu("Memcpy HtoD (Pinned -> Device)", 420, 80, 5, cat="gpu_memcpy"),
        gpu("Memcpy DtoH (Device -> Pinned)", 320, 60, 6, cat="gpu_memcpy"),
        gpu("Memcpy DtoD (Device -> Device)", 600, 10, 7, cat="gpu_memcpy"),  # compute stream work
        gpu("tiny_gap_kernel", 615, 10, 8),  # a 5 us gap: under MIN_GAP_US, not listed
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_gaps.summarize(trace_gaps.load(str(path)))
    assert s["span_ms"] == 0.615 and s["compute_busy_ms"] == 0.37 and s["compute_idle_ms"] == 0.245
    assert (s["host_copy_ms"], s["host_copy_hidden_ms"], s["host_copy_exposed_ms"]) == (0.14, 0.06, 0.08)
    assert s["host_copy_by_kind_ms"] == {"HtoD": 0.08, "DtoH": 0.06}
    assert s["gaps"] == [dict(culprit="blocked: cudaStreamSynchronize", ms=0.1, count=1),
                         dict(culprit="waited on a stream: record_stream_wait", ms=0.1, count=1),
                         dict(culprit="launch: aten::silu", ms=0.04, count=1)]
    assert trace_gaps.summarize([op("x", 0, 1)]) == {"error": "no GPU events in the trace"}


def test_bench_model_flops_and_mfu():
    """The MFU formula on Llama-3.1-8B: 7.50e9 matrix weights (embeddings excluded, lm_head counted),
    4 FLOPs each per token for LoRA, 6 for full, plus causal attention over the token-weighted length."""
    import bench
    import onthefly

    c = onthefly.llama_config("llama-3.1-8b")
    matrices = 32 * (4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336) + 128256 * 4096
    assert matrices == 7_504_658_432
    assert bench.model_flops_per_token(c, "lora", [0]) == 4 * matrices
    assert bench.model_flops_per_token(c, "full", [0]) == 6 * matrices
    # two sequences, 100 and 300 tokens: n = (100^2 + 300^2) / 400 = 250
    assert bench.model_flops_per_token(c, "qlora", [100, 300]) == 4 * matrices + 6 * 32 * 4096 * 250
    assert bench.mfu(1e9, 989.4e3, 1, "NVIDIA H200") == 1.0 and bench.mfu(1e9, 989.4e3, 2, "NVIDIA H100 80GB HBM3") == 0.5
    assert bench.mfu(1e9, 1.0, 1, "Some other GPU") is None
