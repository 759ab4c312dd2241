"""Load an official QSD-Transformer or Meta-SpikeFormer ImageNet checkpoint, convert it, report it.

    python examples/reference_checkpoint.py CHECKPOINT.pth --arch spikformer_8_512_CAFormer \\
        --imagenet /data/imagenet --bits 4

Checkpoints: QSD-Transformer (github.com/bollossom/QSD-Transformer, Hugging Face
Xuerui123/QSD_Transformer) and Spike-driven Transformer V2 (github.com/BICLab/Spike-Driven-Transformer-V2).
A QSD checkpoint with LSQ `alpha` keys is imported as a 4-bit model with identical integer
weights; a float checkpoint is converted. Nothing is downloaded: pass the files you have.
Without --imagenet the report runs on a few synthetic images (firing rates are then not those of
real data: use it only to check the pipeline).
"""
import argparse

import qsdcompress as q

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("checkpoint")
ap.add_argument("--arch", default=None, help="e.g. spikformer_8_512_CAFormer, metaspikformer_8_512 "
                "(inferred from the keys when omitted)")
ap.add_argument("--imagenet", default=None, help="ImageNet folder (train/ and val/ in ImageFolder layout)")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--workdir", default="qsdcompress-out")
ap.add_argument("--device", default="auto")
a = ap.parse_args()

data = a.imagenet or "synthetic:16"
model = q.load(a.checkpoint, arch=a.arch)
print(f"loaded {model.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
if a.imagenet:
    print("top-1:", q.eval(model, data=data, split="val", device=a.device)["top1"])

if getattr(model, "qsd_quant_meta", None) is None:  # float checkpoint: convert it
    model = q.convert(model, bits=a.bits, calib_data=data, calib_batches=8)
path = q.save(model, f"{a.workdir}/converted.qsd", kind="converted")
print("wrote", path)

rep = q.report(model, data=data, split="val" if a.imagenet else "test", batches=4, batch_size=16)
t = rep["totals"]
print(f"size {t['size_mb_paper']:.2f} MB (params*bits/32 convention), {t['energy_mj']:.2f} mJ per image")
if "vs_float" in rep:
    print(f"{rep['vs_float']['size_ratio_paper']:.1f}x smaller, {rep['vs_float']['energy_ratio']:.1f}x less energy")
