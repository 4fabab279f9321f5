"""Host-tier weights shared by several engines (processes) through one read-only mapped file."""
from __future__ import annotations

import glob
import multiprocessing as mp
import os

import pytest
import torch

from flexgen_helm.engine.config import ConfigError, Policy
from flexgen_helm.engine.engine import Engine
from flexgen_helm.engine.shared_weights import PREFIX

# every weight tier in use: 20% compute tier, 60% host (the shared part), 20% disk
POLICY = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=60)
PROMPTS = [[2, 100, 200, 300], [2, 5], [2, 7, 8], [2, 40, 41, 42, 43]]


def _generate(engine: Engine):
    r = engine.generate(PROMPTS, max_new_tokens=6, top_logprobs=2)
    return r.sequences, r.logprobs


def _shared_files(d: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(d, PREFIX + "*")))


def _child(model: str, offload: str, barrier, out) -> None:
    torch.set_num_threads(1)
    engine = Engine.from_pretrained(model, policy=POLICY, dtype=torch.float32, offload_dir=offload,
                                    shared_host_weights=True)
    seqs, lps = _generate(engine)
    barrier.wait()  # both engines are open now
    files = _shared_files(offload)
    barrier.wait()  # both have looked before either closes
    out.put({"pid": os.getpid(), "built": engine.weights.shared_built, "files": files, "seqs": seqs, "lps": lps})
    engine.close()


def test_two_processes_share_one_file(tiny_opt, tmp_path):
    offload = str(tmp_path)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(tiny_opt, offload, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children: the thread count changes float rounding
    try:
        with Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=offload) as ref_engine:
            ref_seqs, ref_lps = _generate(ref_engine)
            assert any(s is not None for s in ref_engine.weights.cpu_seg) and not ref_engine.weights.shared_built
    finally:
        torch.set_num_threads(threads)
    assert sorted(r["built"] for r in results) == [False, True]  # one built it, the other mapped it
    for r in results:
        assert r["seqs"] == ref_seqs and r["lps"] == ref_lps
        assert len([f for f in r["files"] if f.endswith(".weights")]) == 1
        assert not any(f.endswith(".tmp") for f in r["files"])
    assert _shared_files(offload) == []  # the last one out removed the file and its lock
    assert os.listdir(offload) == []  # and each engine its own disk-tier directory


def test_same_process_engines_share_and_clean_up(tiny_opt, tmp_path):
    offload = str(tmp_path)
    a = Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=offload, shared_host_weights=True)
    b = Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=offload, shared_host_weights=True)
    assert (a.weights.shared_built, b.weights.shared_built) == (True, False)
    seg_a = next(s for s in a.weights.cpu_seg if s is not None)
    seg_b = next(s for s in b.weights.cpu_seg if s is not None)
    assert seg_a.untyped_storage().data_ptr() != seg_b.untyped_storage().data_ptr()  # two mappings, one file
    assert a.tiers.stats["cpu"].used > 0  # mapped bytes count against the host budget
    a.close()
    assert len(_shared_files(offload)) == 2  # b still uses it: data file and lock stay
    assert _generate(b)  # b unaffected by a's close
    b.close()
    assert _shared_files(offload) == []
    # another dtype is another file: never mixed with these bytes
    c = Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.bfloat16, offload_dir=offload,
                               shared_host_weights=True)
    assert c.weights.shared_built
    c.close()


def test_mapping_is_read_only(tiny_opt, tmp_path):
    with Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=str(tmp_path),
                                shared_host_weights=True) as e:
        assert any(s is not None for s in e.weights.cpu_seg)
        with open(f"/proc/{os.getpid()}/maps") as f:
            line = next(l for l in f if PREFIX in l)
        assert line.split()[1].startswith("r-")  # mapped without write permission


def test_needs_offload_dir(tiny_opt):
    with pytest.raises(ConfigError, match="offload_dir"):
        Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, shared_host_weights=True)


def test_killed_builder_leaves_nothing_that_is_mapped(tiny_opt, tmp_path):
    from flexgen_helm.engine import shared_weights

    real_finish = shared_weights.SharedHostFile.finish
    shared_weights.SharedHostFile.finish = lambda self: (_ for _ in ()).throw(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=str(tmp_path),
                                   shared_host_weights=True)
    finally:
        shared_weights.SharedHostFile.finish = real_finish
    assert os.listdir(tmp_path) == []  # temp file, lock and private dir all removed
    # a builder that died without cleaning up: its temp file never becomes the shared file
    with Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=str(tmp_path),
                                shared_host_weights=True) as e:
        built_name = next(f for f in _shared_files(str(tmp_path)) if f.endswith(".weights"))
    stale = tmp_path / f"{built_name}.999999.tmp"
    stale.write_bytes(b"partial")
    with Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=str(tmp_path),
                                shared_host_weights=True) as e:
        assert e.weights.shared_built and not stale.exists()
    assert os.listdir(tmp_path) == []
