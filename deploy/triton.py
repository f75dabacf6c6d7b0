"""`kiln deploy triton`: one variant of an artifact folder as a Triton model repository entry.

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx      (onnxruntime_onnx)   or   REPO/<name>/1/model.pt   (pytorch_libtorch)
                                  or   REPO/<name>/1/model.xml + model.bin (backend openvino)
    REPO/<name>/README.md         (text models only: what Triton lacks to serve them)

Everything comes from the manifest: the I/O names and TYPE_* dtypes from its signature (through the one dtype table,
kiln.core.signature), dims without the batch dimension, the file byte for byte (sha256 checked). The batcher follows
`kiln serve`: max_batch_size is ServeConfig's limit and max_queue_delay_microseconds its batch delay;
preferred_batch_size lists the batch sizes bench.json measured cheaper per item (see common.preferred_batch_sizes).
The model folder is staged beside its target and renamed into place, so other models in REPO are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.core import paths
from kiln.core.console import Progress, to_stderr
from kiln.core.errors import UsageError
from kiln.core.manifest import Manifest, VariantEntry, read_manifest
from kiln.core.signature import DTYPE_TABLE, TensorSpec
from kiln.deploy.common import copy_verified, preferred_batch_sizes, read_bench, resolve_variant, staged_folder
from kiln.serve.server import ServeConfig

_SERVE_DEFAULTS = ServeConfig(artifact_dirs=(".",))  # kiln serve's defaults: Triton batches as kiln serve would
DEFAULT_MAX_BATCH_SIZE = _SERVE_DEFAULTS.max_batch_size
DEFAULT_MAX_BATCH_DELAY_MS = _SERVE_DEFAULTS.max_batch_delay_ms
VERSION = "1"


@dataclass(frozen=True)
class Platform:
    name: str  # config.pbtxt's platform (or backend, see `key`)
    file: str  # the model file's name inside the version folder, as the backend looks for it
    threads_key: str  # the backend's intra-op thread parameter
    indexed_names: bool  # TorchScript has no I/O names: the PyTorch backend binds by <name>__<index>
    key: str = "platform"  # OpenVINO's backend is named by `backend:`, it has no platform name
    parameters: tuple[tuple[str, str], ...] = ()  # the backend settings kiln serve runs the variant with


PLATFORMS = {
    "onnx": Platform("onnxruntime_onnx", "model.onnx", "intra_op_thread_count", indexed_names=False),
    "torchscript": Platform("pytorch_libtorch", "model.pt", "INTRA_OP_THREAD_COUNT", indexed_names=True),
    # Triton's OpenVINO backend reads IR (model.xml, its weights model.bin beside it); one stream and the latency
    # hint, as kiln.core.runtimes.openvino compiles it.
    "openvino": Platform("openvino", "model.xml", "INFERENCE_NUM_THREADS", indexed_names=False, key="backend",
                         parameters=(("PERFORMANCE_HINT", "LATENCY"), ("NUM_STREAMS", "1"))),
}


@dataclass(frozen=True)
class TritonOptions:
    out: Path
    variant: str | None = None
    name: str | None = None
    instances: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_delay_ms: float = DEFAULT_MAX_BATCH_DELAY_MS
    threads: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.instances < 1 or self.max_batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise UsageError("--instances, --max-batch-size and --threads must be positive integers")
        if not 0 <= self.max_batch_delay_ms <= 1000:
            raise UsageError("--max-batch-delay-ms must lie in 0..1000")
        if self.name is not None:
            check_model_name(self.name)


def check_model_name(name: str) -> str:
    """Triton's model name is its folder's name: kiln's one rule for model names (kiln.core.paths) fits it."""
    return paths.check_model_name(name, UsageError, "choose another with --name, e.g. --name digits")


def refusal(entry: VariantEntry) -> str | None:
    """Why Triton's backends cannot take this variant as kiln verified it, or None when they can."""
    if entry.format == "pt2":
        return (f"{entry.name!r} is an AOTInductor package (.pt2): Triton's pytorch_libtorch platform loads TorchScript "
                "only, and its torch_aoti platform (beta since Triton 26.03) does not batch beyond 1 and loads a "
                "package only under the torch that compiled it")
    if entry.precision == "bf16" and entry.format != "openvino":
        return (f"{entry.name!r} computes in bfloat16, which kiln verified only under the torch that exported it "
                "(Triton's libtorch is another build, and CPUs without AVX-512 BF16 or AMX emulate bf16 many times "
                "slower)")
    if entry.format not in PLATFORMS:
        return f"{entry.name!r} is a {entry.format} artifact, which no Triton backend kiln knows loads"
    return None


def openvino_parameters(entry: VariantEntry, notes: list[str]) -> list[tuple[str, str]]:
    """The precision settings the backend offers for what kiln verified: it has a bf16 hint (`HINT_BF16`) and no
    way to pin fp32, so an fp32 IR runs in the CPU plugin's default precision there (bf16 on AMX CPUs)."""
    if entry.precision == "bf16":
        notes.append(f"{entry.name}: HINT_BF16 asks Triton's OpenVINO for bf16, which a CPU without AVX-512 BF16 or "
                     "AMX ignores (it then runs fp32, slower than kiln measured)")
        return [("HINT_BF16", "YES")]
    if entry.precision == "fp32":
        notes.append(f"{entry.name}: Triton's OpenVINO backend cannot pin fp32; on an AMX CPU OpenVINO runs it in bf16 "
                     "by default, which kiln did not verify for this variant (ov-bf16 is that variant)")
    else:
        notes.append(f"{entry.name}: its layers kept out of INT8 run in the backend's default precision (fp32, or "
                     "bf16 on AMX CPUs); kiln verified them in bf16 where the CPU has it")
    return []


def triton_variants(manifest: Manifest) -> list[str]:
    return [v.name for v in manifest.variants if refusal(v) is None]


def check_deployable(manifest: Manifest, entry: VariantEntry) -> None:
    reason = refusal(entry)
    if reason is not None:
        can = triton_variants(manifest)
        choice = (f"deploy one of {', '.join(can)} with --variant" if can else
                  "re-export the folder with an onnx-* or torchscript-fp32 variant")
        raise UsageError(f"{reason}; {choice}")


def is_batched(manifest: Manifest) -> bool:
    """Whether every tensor's first dim is symbolic (the batch): then Triton batches and dims leave it out."""
    tensors = (*manifest.signature.inputs, *manifest.signature.outputs)
    return all(t.shape and isinstance(t.shape[0], str) for t in tensors)


def io_name(spec: TensorSpec, index: int, kind: str, indexed: bool) -> str:
    """The name config.pbtxt gives a tensor. TorchScript: `<name>__<index>`, the PyTorch backend's rule for binding
    by position (it splits at the first '__', so names that hold '__' or end in '_' fall back to INPUT__i)."""
    if not indexed:
        return spec.name
    if "__" in spec.name or spec.name.endswith("_"):
        return f"{kind.upper()}__{index}"
    return f"{spec.name}__{index}"


def _tensor_block(spec: TensorSpec, name: str, batched: bool) -> list[str]:
    dims = [d if isinstance(d, int) else -1 for d in (spec.shape[1:] if batched else spec.shape)]
    lines = ["  {", f'    name: "{name}"', f"    data_type: {DTYPE_TABLE[spec.dtype].triton}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:  # a scalar per item: Triton wants a dim, reshaped away
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return [*lines, "  }"]


@dataclass(frozen=True)
class TritonPlan:
    """What `write_triton` writes, computed without touching the disk."""

    name: str
    entry: VariantEntry
    platform: Platform
    config: str
    readme: str | None
    names: dict[str, str]  # manifest tensor name -> config.pbtxt name
    preferred: list[int]
    notes: list[str]


def plan(manifest: Manifest, options: TritonOptions) -> TritonPlan:
    entry = resolve_variant(manifest, options.variant)
    check_deployable(manifest, entry)
    name = check_model_name(options.name or manifest.model)
    platform = PLATFORMS[entry.format]
    batched = is_batched(manifest)
    notes: list[str] = []
    figures, bench_note = read_bench(manifest, entry)
    notes.append(bench_note)
    max_batch = options.max_batch_size if batched else 0
    preferred = preferred_batch_sizes(figures, max_batch) if batched else []
    if batched and figures is not None:
        notes.append("preferred_batch_size: " + (", ".join(map(str, preferred)) if preferred else
                     "none (items/s grew less than 10% with the batch size; the batcher sends what has arrived)"))

    signature = manifest.signature
    names: dict[str, str] = {}
    for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for index, spec in enumerate(specs):
            names[spec.name] = io_name(spec, index, kind, platform.indexed_names)
    header = [
        f"# Written by `kiln deploy triton` from model {manifest.model!r}, variant {entry.name!r} "
        f"({entry.format}, {entry.precision}), sha256 {entry.sha256}.",
        f"# max_batch_size and max_queue_delay_microseconds follow `kiln serve --max-batch-size {options.max_batch_size}"
        f" --max-batch-delay-ms {options.max_batch_delay_ms:g}`.",
    ]
    if platform.indexed_names:
        header.append("# TorchScript names no tensors: the PyTorch backend binds <name>__<index> by position; "
                      + ", ".join(f"{new} is {old!r}" for old, new in names.items()) + ".")
    if manifest.is_text:
        header.append("# A text model: these are token-id tensors. Triton has no tokenizer step here; see README.md.")
    lines = [*header, f'name: "{name}"', f'{platform.key}: "{platform.name}"', f"max_batch_size: {max_batch}",
             "input ["]
    blocks = [_tensor_block(spec, names[spec.name], batched) for spec in signature.inputs]
    lines += _join_blocks(blocks)
    lines += ["]", "output ["]
    lines += _join_blocks([_tensor_block(spec, names[spec.name], batched) for spec in signature.outputs])
    lines.append("]")
    if batched:
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        lines.append(f"  max_queue_delay_microseconds: {round(options.max_batch_delay_ms * 1000)}")
        lines.append("}")
    lines += ["instance_group [", "  {", f"    count: {options.instances}", "    kind: KIND_CPU", "  }", "]"]
    parameters = list(platform.parameters)
    if options.threads is not None:
        parameters.append((platform.threads_key, str(options.threads)))
    if entry.format == "openvino":
        parameters += openvino_parameters(entry, notes)
    for key, value in parameters:
        lines += ["parameters {", f'  key: "{key}"', f'  value: {{ string_value: "{value}" }}', "}"]
    if entry.format == "torchscript":
        torch_version = (manifest.versions or {}).get("torch")
        notes.append(f"the TorchScript archive was saved by torch {torch_version}: Triton's PyTorch backend loads it "
                     "only if its libtorch knows every op in it; try it on the Triton release you run")
    readme = text_readme(manifest, entry, name, names) if manifest.is_text else None
    return TritonPlan(name, entry, platform, "\n".join(lines) + "\n", readme, names, preferred, notes)


def _join_blocks(blocks: list[list[str]]) -> list[str]:
    out: list[str] = []
    for index, block in enumerate(blocks):
        out += block[:-1] + [block[-1] + ("," if index < len(blocks) - 1 else "")]
    return out


def text_readme(manifest: Manifest, entry: VariantEntry, name: str, names: dict[str, str]) -> str:
    """What a Triton repository for a text model lacks, stated exactly: kiln serve tokenizes, Triton does not."""
    from kiln.core.preprocessing import DEFAULT_MAX_LENGTH

    pre, spec = manifest.preprocessing, manifest.preprocessing_spec
    tokenizer = spec.tokenizer or "tokenizer.json"
    max_length = spec.max_length if spec.max_length is not None else DEFAULT_MAX_LENGTH
    settings = ", ".join(f"{key}={pre[key]!r}" for key in ("max_length", "truncation", "padding", "lowercase")
                         if key in pre) or f"max_length={max_length}"
    files = "\n".join(f"   - `{f.get('file')}` (sha256 `{f.get('sha256')}`)" for f in manifest.files) or \
        f"   - `{tokenizer}`"
    inputs = ", ".join(f"`{names[s.name]}` ({s.dtype}, shape {list(s.shape)})" for s in manifest.signature.inputs)
    outputs = ", ".join(f"`{names[s.name]}` ({s.dtype}, shape {list(s.shape)})" for s in manifest.signature.outputs)
    return f"""# {name}: NOT a complete deployment

Written by `kiln deploy triton` from model `{manifest.model}`, variant `{entry.name}` (sha256 `{entry.sha256}`).

`{manifest.model}` is a text model. `kiln serve` takes text and tokenizes it; this Triton model takes token ids:

- inputs: {inputs}
- outputs: {outputs}

## What is missing

kiln does not generate the tokenizer step. Before Triton can answer text, someone must add one of:

1. A tokenizer model in front of this one: a Triton Python-backend model that loads `{tokenizer}` with the Hugging
   Face `tokenizers` library, as `kiln serve` does (kiln.core.preprocessing), with the manifest's settings
   ({settings}; the tokenizer file carries its own normalization), and emits the inputs above as int64; plus an
   ensemble model (`platform: "ensemble"`) that chains it to `{name}`. The tokenizer files are in the artifact folder:
{files}
2. Or tokenization in every client, with exactly those files and settings (the results otherwise differ from
   `kiln serve`'s, which the export verified).

Also not here:

- Requests batch together in Triton only when their sequence lengths agree (this config has no ragged batching):
  pad to a fixed length (max_length {max_length}) in the tokenizer step to let the batcher combine them.
- kiln's `/predict` route, its input validation and its metrics: Triton serves its own V2 routes only.

Until then this folder serves token ids only. To serve text as verified, use `kiln serve` (or `kiln deploy kserve`).
"""


def write_triton(folder: str | Path, options: TritonOptions, progress: Progress = to_stderr) -> TritonPlan:
    """Check everything, then write REPO/<name>/ atomically; returns the plan (its notes went to `progress`)."""
    manifest = read_manifest(folder)
    result = plan(manifest, options)
    manifest.verify_file(result.entry.name)  # a tampered artifact is refused before anything is written
    target = Path(options.out) / result.name
    with staged_folder(target, options.force) as staging:
        (staging / VERSION).mkdir()
        # Each of the variant's files under the platform's name, its suffix kept (OpenVINO: model.xml, model.bin).
        stem = Path(result.platform.file).stem
        for source, recorded in zip(manifest.paths_of(result.entry), result.entry.artifact_files, strict=True):
            name = result.platform.file if recorded.file == result.entry.file else (
                stem + recorded.file[len(Path(result.entry.file).stem):])
            copy_verified(source, staging / VERSION / name, recorded.sha256)
        (staging / "config.pbtxt").write_text(result.config)
        if result.readme is not None:
            (staging / "README.md").write_text(result.readme)
    for note in result.notes:
        progress(f"[kiln] deploy triton: {note}")
    if result.readme is not None:
        progress(f"[kiln] deploy triton: WARNING: {manifest.model!r} is a text model and {target} is NOT a complete "
                 f"deployment: it takes token ids, and the tokenizer step kiln serve runs is missing (see "
                 f"{target / 'README.md'})")
    return result
