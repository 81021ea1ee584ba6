#!/usr/bin/env bash
# The GPU path, checked on a single-GPU machine with no network, in under 5 minutes.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# Needs, beside this checkout, the wheels in .whl/ (prepared on a machine with
# PyPI: see bench/README.md, "gpu_check.sh"): dask, distributed, dask-cuda and
# what they need that the GPU image lacks, and scikit-learn 1.9. CuPy is NOT
# carried (cupy-cuda12x is ~100 MiB): the machine's own CuPy (cupy-cuda13x
# there) is used; the `gpu` extra installs cupy-cuda12x on a normal install.
# Prefect and MLflow are not carried either (too big): the check runs the
# labeler's own trial function (flows/labeler.py, what the pipeline's trial
# task calls) on a dask_cuda.LocalCUDACluster, as the pipeline's sweep does.
#
# What it prints: the GPU (NVML), each sweep trial with evidence that its
# arrays were CuPy arrays on the device (type, device, bytes; CuPy's memory
# pool), a check that the returned model holds NumPy arrays only and predicts
# on the CPU, and a CPU vs GPU fit time on a workload big enough to matter
# (dense float32, LogisticRegression, the same fixed number of iterations).
# On a machine without a GPU it stops at once with "no GPU found".
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# NOTE: SciPy reads this once, at import; scikit-learn's array-API dispatch needs it.
export SCIPY_ARRAY_API=1
PY=${PYTHON:-python3}

"$PY" - <<'EOF'
import sys
try:
    import pynvml
    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
except Exception as exc:  # noqa: BLE001 - any failure here means: no usable GPU
    sys.exit(f"no GPU found (NVML: {type(exc).__name__}: {exc}); run this on a GPU machine")
if count < 1:
    sys.exit("no GPU found (NVML reports 0 devices); run this on a GPU machine")
EOF

SITE=${GPU_CHECK_SITE:-/tmp/uncool-gpu-site}
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: prepare them first (bench/README.md, gpu_check.sh)" >&2
    exit 1
fi
started=$(date +%s)
"$PY" -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "installed $(ls .whl/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - started )) s"

# NOTE: a file, not stdin: Dask's worker processes are spawned, and spawn
# re-runs the main module by path (hence the __main__ guard at the end).
MAIN="$SITE/gpu_check_main.py"
cat > "$MAIN" <<'EOF'
import importlib.metadata as md
import importlib.util
import os
import pickle
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

T0 = time.perf_counter()
sys.path.insert(0, os.path.abspath("flows"))  # absolute: the workers inherit it
import labeler  # noqa: E402  (the pipeline's own training code)


def versions() -> str:
    names = ["scikit-learn", "numpy", "scipy", "cupy-cuda13x", "cupy-cuda12x", "cupy", "dask",
             "distributed", "dask-cuda", "nvidia-ml-py"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def sample_rows(days: int) -> list[dict[str, str]]:
    """The pipeline's sample data, without importing the plugin (Prefect is not here)."""
    for name in ("uncool_prefect", "uncool_prefect.sources"):  # bare packages: no __init__ run
        package = types.ModuleType(name)
        package.__path__ = [str(Path(*name.split(".")).resolve())]
        sys.modules[name] = package
    from uncool_prefect.sources.sample import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        write_sample(tmp, days=days, seed=0)
        return [{"id": f"{p.parent.name}/{p.stem}", "text": p.read_text().strip(),
                 "label": p.parent.name} for p in sorted(Path(tmp).glob("*/*.txt"))]


def gpu_trial(rows, params, metric, val_size, seed):
    """labeler.run_trial on a worker, device="gpu", with CuPy's asarray watched."""
    import cupy

    seen = []
    real = cupy.asarray

    def watched(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(f"{type(out).__module__}.{type(out).__name__} on {out.device} "
                    f"{out.dtype} {out.shape} {out.nbytes / 2**20:.2f} MiB")
        return out

    cupy.asarray = watched
    try:
        started = time.perf_counter()
        model, scores = labeler.run_trial(rows, params, metric, val_size, seed, device="gpu")
        seconds = time.perf_counter() - started
    finally:
        cupy.asarray = real
    pool = cupy.get_default_memory_pool()
    return {"model": labeler.dump_model(model), "scores": scores, "seen": seen,
            "pool_total_bytes": pool.total_bytes(), "seconds": seconds,
            "worker_gpu": os.environ.get("CUDA_VISIBLE_DEVICES", "?")}


def fit_once(X, y, xp_name: str) -> tuple[float, int]:
    """One LogisticRegression fit, a fixed 100 lbfgs iterations, on NumPy or CuPy arrays."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=100, tol=1e-12)  # separable data: all 100 iterations run
    started = time.perf_counter()
    if xp_name == "cupy":
        import cupy

        with sklearn.config_context(array_api_dispatch=True):
            clf.fit(X, y)
        cupy.cuda.Device().synchronize()
    else:
        clf.fit(X, y)
    seconds = time.perf_counter() - started
    return seconds, int(np.asarray(clf.n_iter_.get() if hasattr(clf.n_iter_, "get") else clf.n_iter_)[0])


def main() -> None:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    name = pynvml.nvmlDeviceGetName(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    print(f"GPU 0: {name}, {memory.total / 2**30:.0f} GiB, driver {pynvml.nvmlSystemGetDriverVersion()}, "
          f"{pynvml.nvmlDeviceGetCount()} GPU(s)")
    print(f"python {sys.version.split()[0]}; {versions()}")
    import cupy
    import yaml
    from dask_cuda import LocalCUDACluster
    from distributed import Client, wait

    # (1) the sweep of params.yaml on a LocalCUDACluster, as compute.choose() starts it
    params = yaml.safe_load(Path("flows/params.yaml").read_text())["train"]
    sweep = params["sweep"]
    points = labeler.expand_grid(sweep["grid"])
    rows = sample_rows(days=3)
    started = time.perf_counter()
    with LocalCUDACluster(resources={"GPU": 1}, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        print(f"LocalCUDACluster: {len(cluster.workers)} worker(s), up in "
              f"{time.perf_counter() - started:.1f} s; {len(points)} trial(s), {len(rows)} rows")
        futures = [client.submit(gpu_trial, rows, labeler.trial_params(params, point), sweep["metric"],
                                 float(sweep["val_size"]), int(params["seed"]),
                                 resources={"GPU": 1}, pure=False)
                   for point in points]
        wait(futures, timeout=180)
        results = client.gather(futures)
    texts = [r["text"] for r in rows[:20]]
    for point, result in zip(points, results, strict=True):
        model = pickle.loads(result["model"])
        classifier = model.named_steps["classifier"]
        arrays = {k: type(v).__module__ for k, v in vars(classifier).items() if hasattr(v, "shape")}
        assert all(m == "numpy" for m in arrays.values()), f"non-NumPy arrays in the model: {arrays}"
        assert result["seen"] and all(s.startswith("cupy.") for s in result["seen"]), result["seen"]
        predicted = model.predict(texts)  # here, in the client: NumPy on the CPU
        print(f"trial {point}: {sweep['metric']} {result['scores'][sweep['metric']]:.3f}, "
              f"{result['seconds']:.2f} s on worker CUDA_VISIBLE_DEVICES={result['worker_gpu']}")
        print(f"  arrays sent to the device: {result['seen'][:2]}")
        print(f"  CuPy memory pool on the worker: {result['pool_total_bytes'] / 2**20:.1f} MiB held")
        print(f"  stored model arrays: {arrays}; predicts on the CPU: {list(predicted[:3])}")

    # (2) CPU vs GPU on a workload big enough to matter
    n, d, k = 100_000, 2_000, 4
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = (X @ rng.standard_normal((d, k), dtype=np.float32)).argmax(axis=1)
    X_gpu, y_gpu = cupy.asarray(X), cupy.asarray(y)
    print(f"\nLogisticRegression (lbfgs, max 100 iterations), dense float32 {n:,} x {d:,}, {k} classes")
    warm, _ = fit_once(X_gpu[:1000], y_gpu[:1000], "cupy")  # kernels compiled here, not below
    gpu = [fit_once(X_gpu, y_gpu, "cupy") for _ in range(2)]
    cpu, cpu_iters = fit_once(X, y, "numpy")
    best, gpu_iters = min(gpu)
    print(f"  CPU (NumPy, {os.cpu_count()} cores): {cpu:.2f} s, {cpu_iters} iterations")
    print(f"  GPU ({name}, CuPy): {best:.2f} s, {gpu_iters} iterations (runs "
          f"{', '.join(f'{g:.2f}' for g, _ in gpu)} s; warm-up {warm:.2f} s)")
    print(f"  speed-up CPU/GPU: {cpu / best:.1f}x; per iteration {(cpu / cpu_iters) / (best / gpu_iters):.1f}x")
    print(f"\ngpu_check: OK in {time.perf_counter() - T0:.0f} s")


if __name__ == "__main__":
    main()
EOF
exec timeout 270 "$PY" "$MAIN"
