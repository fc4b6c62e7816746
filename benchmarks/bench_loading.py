"""Peak RSS and time of loading a full-size SD 2.1-base with random weights, and of safetensors readers.

Writes (once, under ``--dir``) a diffusers folder and an original-layout single ``.safetensors``
built from the bundled SD 2.1-base configs with random weights, then runs each case in its own
subprocess, so every peak RSS (``VmHWM``) belongs to that case alone:

* ``folder`` / ``single``: ``load_base_model`` on the folder / the single file;
* ``folder-low-cpu-mem-off``: diffusers' ``from_pretrained(low_cpu_mem_usage=False)``, the path it falls back
  to without ``accelerate`` (random initialisation, then a copy of the weights);
* ``read-ours`` / ``read-safetensors`` (mmap, then a copy) / ``read-safetensors-pread`` (its own
  buffers) / ``read-safetensors-pread-copy``: every tensor of the single file into float32 CPU
  tensors that own their memory; ``kept`` is the RSS after the read minus the bytes of the tensors
  read (heap that stays with the process).

Each case starts with the files in the page cache (read once before it), so times compare readers,
not the disk.

``peak_rss_gb`` is the process's VmHWM, which also counts pages of files it maps (reclaimable page cache);
``peak_anonymous_gb`` (RssAnon sampled every 10 ms) is the memory it really had to have.

Prints one JSON document. ``--delete`` removes what was written (5 GB each) at the end.

    python benchmarks/bench_loading.py --dir /tmp/sd21-random --cases folder,single --delete
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CASES = (
    "folder",
    "single",
    "folder-low-cpu-mem-off",
    "read-ours",
    "read-safetensors",
    "read-safetensors-pread",
    "read-safetensors-pread-copy",
)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base"


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _write(root: Path) -> tuple[Path, Path]:
    """A random full-size SD 2.1-base as a diffusers folder and as one original-layout .safetensors."""
    folder, single = root / "sd21-base", root / "sd21-base.safetensors"
    if folder.is_dir() and single.is_file():
        return folder, single
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ldm_export import ldm_state_dict, write_diffusers_folder
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from fidesr_core.networks.model import BaseModel

    torch.manual_seed(0)
    base = BaseModel(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(str(CONFIG_DIR / "text_encoder" / "config.json"))),
        source="random",
        kind="random",
    )
    root.mkdir(parents=True, exist_ok=True)
    write_diffusers_folder(base, folder)
    state = {key: value.contiguous() for key, value in ldm_state_dict(base).items()}
    del base
    save_file(state, str(single), metadata={"format": "pt"})
    return folder, single


def _warm_page_cache(path: Path) -> None:
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            while handle.read(64 * 2**20):
                pass


def _read(single: Path, reader: str) -> dict:
    """Every tensor of ``single`` as float32 tensors owning their memory."""
    import torch

    if reader == "ours":
        from fidesr_core.loading.files import read_header, read_tensors

        tensors = read_tensors(single, read_header(single)[0].shapes, torch.float32)
    else:
        import safetensors

        pread = reader.startswith("safetensors-pread")
        copy = reader != "safetensors-pread"  # pread alone hands over its own (not 64-byte aligned) buffers
        with safetensors.safe_open(str(single), framework="pt", **({"backend": "pread"} if pread else {})) as handle:
            tensors = {key: handle.get_tensor(key).to(torch.float32, copy=copy) for key in handle.keys()}
    return tensors


def _from_pretrained_without_low_cpu_mem_usage(folder: Path) -> tuple:
    """The U-Net and VAE by ``from_pretrained(low_cpu_mem_usage=False)`` (random init, then copy), the text encoder
    by transformers' ``from_pretrained``: what a diffusers without ``accelerate`` does (peft needs accelerate)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    common = {"local_files_only": True, "low_cpu_mem_usage": False}
    return (
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **common),
        AutoencoderKL.from_pretrained(folder, subfolder="vae", **common),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
    )


def _child(case: str, folder: Path, single: Path) -> dict:
    import torch

    from fidesr_core.loading.base_model import load_base_model

    torch.set_num_threads(2)
    peak_anonymous = [0]

    def sample_anonymous() -> None:  # VmHWM also counts pages of mapped files, which the kernel can drop
        while True:
            peak_anonymous[0] = max(peak_anonymous[0], _status_bytes("RssAnon"))
            time.sleep(0.01)

    threading.Thread(target=sample_anonymous, daemon=True).start()
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if case.startswith("read-"):
        tensors = list(_read(single, case.removeprefix("read-")).values())
    else:
        if case == "folder-low-cpu-mem-off":  # what diffusers falls back to without accelerate
            modules = _from_pretrained_without_low_cpu_mem_usage(folder)
        else:
            base = load_base_model(folder if case == "folder" else single)
            modules = (base.unet, base.vae, base.text_encoder)
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    gc.collect()
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # weights left as views of a mapped file are only read from disk when touched
        for tensor in tensors:
            tensor.float().sum()
    after = _status_bytes("VmRSS")
    return {
        "case": case,
        "seconds": round(seconds, 1),
        "rss_before_gb": round(before / 1e9, 2),
        "peak_rss_gb": round(_status_bytes("VmHWM") / 1e9, 2),
        "peak_anonymous_gb": round(peak_anonymous[0] / 1e9, 2),
        "rss_after_gb": round(after / 1e9, 2),
        "tensors_gb": round(tensor_bytes / 1e9, 2),
        "kept_beyond_tensors_gb": round((after - before - tensor_bytes) / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the random model is written (10 GB)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--delete", action="store_true", help="remove the written model at the end")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder, single = args.dir / "sd21-base", args.dir / "sd21-base.safetensors"
    if args.child == "write":
        _write(args.dir)
        return
    if args.child:
        print(json.dumps(_child(args.child, folder, single)))
        return
    cases = [case for case in args.cases.split(",") if case]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    if not (folder.is_dir() and single.is_file()):  # written in a child: the parent stays small
        subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--child", "write"], check=True)
    results = []
    for case in cases:
        _warm_page_cache(folder if case.startswith("folder") else single)
        command = [sys.executable, __file__, "--dir", str(args.dir), "--child", case]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        results.append(
            json.loads(lines[-1]) if done.returncode == 0 and lines else {"case": case, "error": done.stderr[-2000:]}
        )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.delete:
        shutil.rmtree(args.dir)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
