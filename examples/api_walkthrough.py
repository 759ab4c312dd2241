"""The pipeline from Python: convert, finetune, export and report the bundled digits model.

    python examples/api_walkthrough.py          # about 3-5 minutes on a 2-core CPU
"""
import qsdcompress as q

workdir = "qsdcompress-out"

# 1. The bundled qsd_tiny (integer spikes, D=4, T=1) trained on scikit-learn's digits.
float_model = q.load()
print("float top-1:", q.eval(float_model)["top1"])

# 2. 4-bit weights (Brevitas, per-channel learned scales, mse init) + IE-LIF on q/k/v,
#    calibrated on digits; the float model is left untouched.
w4 = q.convert(float_model, bits=4, ie_lif="qkv")
print("W4 top-1 before finetuning:", q.eval(w4)["top1"])
q.save(w4, f"{workdir}/converted.qsd", kind="converted", keep_float=True)  # finetune starts from float

# 3. Distillation-based QAT from the counterpart ANN: CE + logit KD + fine-grained distillation.
ft = q.finetune(f"{workdir}/converted.qsd", teacher="ann", workdir=workdir, epochs=2)
print("W4 finetuned top-1:", ft["top1"], "->", ft["output"])

# 4. ONNX with really packed 4-bit weights, checked against onnxruntime after export.
ex = q.export(ft["output"], f"{workdir}/model.onnx")
print(f"ONNX: {ex['file_bytes']} bytes, max |logit diff| {ex['max_abs_diff']:.2e}")
print("onnxruntime top-1:", q.eval(ex["output"])["top1"])

# 5. Size, firing rates, SOPs and energy against the float model.
rep = q.report(ft["output"], workdir=workdir)
t = rep["totals"]
print(f"size {t['size_bytes']} B, {t['sops']:.3g} SOPs, {t['energy_mj']:.4f} mJ per image; "
      f"{rep['vs_float']['size_ratio']:.1f}x smaller, {rep['vs_float']['energy_ratio']:.1f}x less energy")

# Spike-driven inference: every integer spike as D binary spikes over D virtual steps.
q.set_spike_mode(w4, "binary")
print("W4 top-1, binary spikes:", q.eval(w4)["top1"])
