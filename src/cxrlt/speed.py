"""Speed at real scale, as ratios to the reference path measured in the same run on the same files.

The reference path is the research code's preprocessing: full-size colour decode, LANCZOS4
resize, one JPEG file per image; its loader reads those files back. A ratio is only
meaningful within one run on one machine (the CPU is often shared), so every row carries the
machine and each method's rate is the best of `repeats` interleaved passes over the same
files. `bench/bench_speed.py` (`make bench`) prints the table; `bench/bench_gpu_step.py` the
GPU training step alone.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlt.data.cache import ImageCache, _cv2, _fit, _pad, build_cache, encode

MIMIC_IMAGES = 377_110  # MIMIC-CXR-JPG 2.x


@dataclass
class Row:
    """One line of the table: a rate (images/s) or a size (bytes/image), and its ratio."""

    what: str
    path: str
    value: float
    unit: str
    ratio: float | None
    machine: str
    note: str = ""


def machine() -> str:
    """CPU model and logical cores, for the table's machine column."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def make_originals(root: Path, n: int, noise: float = 2.0, seed: int = 0) -> list[str]:
    """Chest-X-ray-sized (2,500 x 3,000) 8-bit JPEGs at quality 95: smooth structure plus
    per-pixel noise of `noise` grey levels, which sets the file size (2: ~1.5 MB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:3000, 0:2500].astype(np.float32)
    base = 110 + 60 * np.sin(xx / 170) * np.cos(yy / 210) + 30 * np.exp(-((xx - 1250) / 500) ** 2)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = base + rng.normal(0, noise, base.shape).astype(np.float32) + rng.uniform(-20, 20)
        p = root / f"{i:04d}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p, quality=95)
        paths.append(str(p))
    return paths


def reference_resized(path: str, size: int, out: str | None = None) -> np.ndarray:
    """The research code's path: full-size colour decode, long side to `size` by LANCZOS4,
    written as a JPEG file (`out`). Returned as this project's grey, centred, padded square,
    so that its pixels can be compared with the cache's."""
    cv2 = _cv2()
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: OpenCV cannot read it")
    h, w = img.shape[:2]
    img = cv2.resize(img, _fit(w, h, size), interpolation=cv2.INTER_LANCZOS4)
    if out is not None:
        cv2.imwrite(out, img)
    return _pad(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), size)


def _reference_chunk(args: tuple[list[str], int, str]) -> int:
    paths, size, out_dir = args
    for p in paths:
        reference_resized(p, size, str(Path(out_dir) / Path(p).name))
    return len(paths)


def _best_rates(methods: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """images/s of each method: the fastest of `repeats` rounds, methods interleaved in each."""
    best = dict.fromkeys(methods, 0.0)
    for _ in range(repeats):
        for name, run in methods.items():
            t = time.perf_counter()
            n = run()
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


def bench_build(paths: list[str], size: int, work: Path, workers: int = 2,
                repeats: int = 2) -> tuple[list[Row], Path, Path]:  # fmt: skip
    """Cache build rates at `size` against the reference path (1 process and `workers`).
    Returns the rows, the reference's JPEG folder and a jpeg cache (for the size and loader rows)."""
    n, host = len(paths), machine()
    manifest = pd.DataFrame({"image_id": [str(i) for i in range(n)], "path": paths})
    ref_dir = work / f"reference-{size}"
    counter = iter(range(10**6))

    def reference(w: int) -> Callable[[], int]:
        def run() -> int:
            shutil.rmtree(ref_dir, ignore_errors=True)
            ref_dir.mkdir(parents=True)
            if w == 1:
                return _reference_chunk((paths, size, str(ref_dir)))
            chunks = [(paths[i :: w * 2], size, str(ref_dir)) for i in range(w * 2)]
            with ProcessPoolExecutor(w) as pool:
                return sum(pool.map(_reference_chunk, chunks))
        return run

    def build(decoder: str, fmt: str, w: int) -> Callable[[], int]:
        def run() -> int:
            out = work / f"cache-{size}-{decoder}-{fmt}-{next(counter)}"
            build_cache(manifest, out, size, workers=w, progress=False, chunk=max(1, n // (4 * w)),
                        partial_dir=work / "partial", decoder=decoder, fmt=fmt)  # fmt: skip
            shutil.rmtree(out)
            return n
        return run

    methods = {
        ("reference: colour decode + LANCZOS4 + JPEG file", 1): reference(1),
        ("cache, decoder pil (default), format raw", 1): build("pil", "raw", 1),
        ("cache, decoder cv2, format raw", 1): build("cv2", "raw", 1),
        ("cache, decoder cv2, format jpeg", 1): build("cv2", "jpeg", 1),
        ("cache, decoder turbo, format raw", 1): build("turbo", "raw", 1),
        ("cache, decoder turbo, format jpeg", 1): build("turbo", "jpeg", 1),
        ("reference: colour decode + LANCZOS4 + JPEG file", workers): reference(workers),
        ("cache, decoder pil (default), format raw", workers): build("pil", "raw", workers),
        ("cache, decoder cv2, format raw", workers): build("cv2", "raw", workers),
        ("cache, decoder cv2, format jpeg", workers): build("cv2", "jpeg", workers),
        ("cache, decoder turbo, format raw", workers): build("turbo", "raw", workers),
        ("cache, decoder turbo, format jpeg", workers): build("turbo", "jpeg", workers),
    }
    rates = _best_rates({f"{k[0]}\t{k[1]}": v for k, v in methods.items()}, repeats)
    rows = []
    for (path, w) in methods:
        ref = rates[f"reference: colour decode + LANCZOS4 + JPEG file\t{w}"]
        rate = rates[f"{path}\t{w}"]
        rows.append(Row(f"cache build {size} px, {w} process{'es' if w > 1 else ''}", path, rate,
                        "images/s", rate / ref, host))  # fmt: skip
    jpeg_dir = work / f"cache-{size}-jpeg"
    build_cache(manifest, jpeg_dir, size, workers=workers, progress=False, partial_dir=work / "partial",
                decoder="cv2", fmt="jpeg")  # fmt: skip
    build_cache(manifest, work / f"cache-{size}-raw", size, workers=workers, progress=False,
                partial_dir=work / "partial", decoder="cv2", fmt="raw")  # fmt: skip
    return rows, ref_dir, jpeg_dir


def bench_size(size: int, ref_dir: Path, work: Path) -> list[Row]:
    """Bytes per image of each format and the MIMIC total, against the reference's JPEG files."""
    host = machine()
    raw = ImageCache(work / f"cache-{size}-raw")
    jpeg = ImageCache(work / f"cache-{size}-jpeg")
    rows = np.arange(len(raw.row))
    ref = float(np.mean([p.stat().st_size for p in ref_dir.glob("*.jpg")]))
    sizes = {
        "reference: one colour JPEG file (quality 95)": ref,
        "cache format raw (uint8 memmap)": float(size * size),
        "cache format jpeg (quality 95)": float(np.mean([len(b) for b in jpeg.blobs(rows)])),
        "cache format png (lossless)": float(np.mean([len(encode(a, "png")) for a in raw.read(rows)])),
    }
    return [Row(f"cache size {size} px", k, v, "bytes/image", v / ref, host,
                f"MIMIC ({MIMIC_IMAGES:,} images): {v * MIMIC_IMAGES / 1e9:,.1f} GB") for k, v in sizes.items()]  # fmt: skip


class _Files:
    """The reference loader: one JPEG file per image, read back in colour."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):  # noqa: ANN204 - torch.Tensor
        import torch

        return torch.from_numpy(_cv2().imread(self.paths[i], _cv2().IMREAD_COLOR))


class _Repeat:
    """`data` `times` over, so one timed pass reads enough images to measure."""

    def __init__(self, data: object, times: int):
        self.data, self.times = data, times

    def __len__(self) -> int:
        return len(self.data) * self.times  # type: ignore[arg-type]

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.data[i % len(self.data)]  # type: ignore[index]


def bench_loader(size: int, ref_dir: Path, work: Path, workers: Sequence[int] = (0, 1, 2),
                 min_images: int = 256, repeats: int = 2) -> list[Row]:  # fmt: skip
    """DataLoader images/s over each store, per worker count, against the reference files."""
    from cxrlt.training.data import CachedImages, make_loader

    host = machine()
    files = sorted(str(p) for p in ref_dir.glob("*.jpg"))
    times = max(1, -(-min_images // len(files)))
    stores = {"reference: one JPEG file per image": _Repeat(_Files(files), times)}
    for fmt in ("raw", "jpeg"):
        cache = ImageCache(work / f"cache-{size}-{fmt}")
        manifest = pd.DataFrame({"image_id": cache.row.index})
        stores[f"cache format {fmt} (ImageCache.read)"] = _Repeat(CachedImages(cache, manifest, []), times)
    out = []
    for w in workers:
        loaders = {k: make_loader(d, 16, False, w, seed=0) for k, d in stores.items()}

        def run(loader) -> Callable[[], int]:  # noqa: ANN001
            return lambda: sum(len(b["image"] if isinstance(b, dict) else b) for b in loader)

        rates = _best_rates({k: run(v) for k, v in loaders.items()}, repeats)
        ref = rates["reference: one JPEG file per image"]
        out += [Row(f"loader {size} px, {w} workers", k, v, "images/s", v / ref, host) for k, v in rates.items()]
        del loaders
    return out


def format_table(rows: Sequence[Row]) -> str:
    """Markdown: what, path, value, ratio to the reference in the same run, machine, note."""
    lines = ["| measured | path | value | × reference | machine | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r.value:,.1f} {r.unit}" if r.value < 1000 else f"{r.value:,.0f} {r.unit}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {r.what} | {r.path} | {value} | {ratio} | {r.machine} | {r.note} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# GPU training step and the data path that feeds it


def data_path_rate(cache: ImageCache, batch: int, device: str, steps: int, gpu_decode: bool) -> float:
    """images/s of reading `steps` batches from `cache` onto `device` and augmenting them:
    the data path the training step waits on (decode on the CPU, or batched on the GPU)."""
    import torch

    from cxrlt.models.classifier import ModelConfig, normalise_pixels
    from cxrlt.training.augment import AugmentConfig, augment_batch

    cfg, aug = ModelConfig(), AugmentConfig()
    gen = torch.Generator().manual_seed(0)
    n = len(cache.row)
    dev = torch.device(device)

    def one(k: int) -> None:
        rows = (np.arange(batch) + k * batch) % n
        x = cache.read_tensor(rows, dev) if gpu_decode else torch.from_numpy(cache.read(rows)).to(dev)
        augment_batch(normalise_pixels(x.unsqueeze(1), cfg), aug, gen, cfg.std)

    one(0)
    _sync(dev)
    t = time.perf_counter()
    for k in range(steps):
        one(k)
    _sync(dev)
    return steps * batch / (time.perf_counter() - t)


def _sync(device: object) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StepVariant:
    """How a training step runs: autocast dtype (None: float32), memory layout, AdamW kind, compile."""

    name: str
    dtype: str | None
    channels_last: bool
    fused: bool
    compile: bool


BASELINE = StepVariant("baseline: fp16 autocast + GradScaler, eager, contiguous, AdamW (foreach)",
                       "float16", False, False, False)  # fmt: skip
STEP_VARIANTS = (
    BASELINE,
    StepVariant("fp32 (train.precision 32-true), eager, channels_last, AdamW (foreach)", None, True, False, False),
    StepVariant("bf16 autocast + channels_last + fused AdamW, eager", "bfloat16", True, True, False),
    StepVariant("bf16 autocast + channels_last + fused AdamW + torch.compile (model)", "bfloat16", True, True, True),
)


def gpu_step_rate(backbone: str, size: int, batch: int, variant: StepVariant, steps: int = 20, warmup: int = 5,
                  num_classes: int = 40, device: str = "cuda") -> float:  # fmt: skip
    """Training images/s of one full optimisation step as the train stage runs it (normalise,
    batch augmentation, forward, ASL, backward, AdamW), from a uint8 batch already on the device
    (CUDA; the CPU only so that the same code can be exercised without a GPU). torch.compile
    wraps the model (backbone + head), not the augmentation, whose random draws would make
    it recompile."""
    import torch

    from cxrlt.losses import build_loss
    from cxrlt.models import ModelConfig, build_model
    from cxrlt.training.augment import AugmentConfig, augment_batch

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, channels_last=variant.channels_last), num_classes).to(dev)
    loss_fn = build_loss("asl", {}, np.full(num_classes, 0.05, np.float32)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if variant.fused else None)
    fp16 = variant.dtype == "float16"
    scaler = torch.amp.GradScaler(dev.type, enabled=fp16)
    x = torch.randint(0, 255, (batch, size, size), dtype=torch.uint8, device=dev)
    y = (torch.rand(batch, num_classes, device=dev) < 0.1).float()
    mask = torch.ones_like(y, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    aug = AugmentConfig()
    std = model.cfg.std

    def net(z: torch.Tensor) -> torch.Tensor:
        return model.head(model.features(z))

    net_fn = torch.compile(net) if variant.compile else net
    dtype = getattr(torch, variant.dtype) if variant.dtype else torch.float32

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=variant.dtype is not None):
            logits = net_fn(augment_batch(model.normalise(x), aug, gen, std))
        loss = loss_fn(logits.float(), y, mask)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    model.train()
    for _ in range(warmup):
        step()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return steps * batch / (time.perf_counter() - t)


GPU_CONFIGS = (("mobilenetv3_small_050", 512, 64), ("convnext_small", 1024, 16))


def loader_rate(cache: ImageCache, batch: int, workers: int, min_images: int = 512) -> float:
    """images/s of the training DataLoader (CPU decode in `workers` processes) over `cache`,
    the best of two passes of at least `min_images`."""
    from cxrlt.training.data import CachedImages, make_loader

    data = _Repeat(CachedImages(cache, pd.DataFrame({"image_id": cache.row.index}), []),
                   max(1, -(-min_images // len(cache.row))))  # fmt: skip
    loader = make_loader(data, batch, False, workers, seed=0)
    rate = _best_rates({"x": lambda: sum(len(b["image"]) for b in loader)}, 2)["x"]
    return rate


def gpu_rows(caches: dict[int, Path], steps: int = 20, workers: Sequence[int] = ()) -> Iterator[Row]:
    """The GPU step (fast vs baseline, same call) and the data path at the same size, so the
    table says whether the GPU waits for data: one process decoding on the CPU, the training
    DataLoader with each of `workers` processes, and batched nvJPEG. Rows come as they are
    measured (the cheap ones first), so a run cut short still reports what it finished. Needs CUDA."""
    import torch

    host = f"{torch.cuda.get_device_name(0)}; {machine()}"
    for backbone, size, batch in GPU_CONFIGS:
        what = f"GPU train step {size} px, {backbone}, batch {batch}"
        rates = {}
        for variant in STEP_VARIANTS[:-1]:
            rates[variant] = gpu_step_rate(backbone, size, batch, variant, steps=steps)
            yield Row(what, variant.name, rates[variant], "images/s", rates[variant] / rates[BASELINE], host)
        data = []
        if size in caches:
            cache = ImageCache(caches[size])
            data.append(("CPU decode (1 process) + GPU augmentation", data_path_rate(cache, batch, "cuda", steps, False)))
            data.append(("batched nvJPEG decode + GPU augmentation", data_path_rate(cache, batch, "cuda", steps, True)))
            data += [(f"training DataLoader, {w} workers (CPU decode)", loader_rate(cache, batch, w)) for w in workers]
        fast = gpu_step_rate(backbone, size, batch, STEP_VARIANTS[-1], steps=steps)
        yield Row(what, STEP_VARIANTS[-1].name, fast, "images/s", fast / rates[BASELINE], host)
        for name, rate in data:
            waits = "the GPU waits for data" if rate < fast else "data keeps up"
            yield Row(f"data path {size} px, jpeg cache, batch {batch}", name, rate, "images/s", rate / fast, host,
                      f"× the compiled bf16 step; {waits}")  # fmt: skip
