"""`smoothsmoe models`: every model class of the installed vLLM that builds MoE layers, and what
the plugin does with them.

The table is read from vLLM's model code, not from model names: for each text-generation and
multimodal architecture of vLLM's registry, the source of its module (a package: all of its
files; else the module, or the model modules it imports when it has no call of its own) is
parsed, and every `FusedMoEFactory(...)` call's arguments are read as the plugin reads them at
load time (engine/layer_plan.py, routing_config): the scoring function, a correction bias, grouping, a
custom routing function (imported and recognised by what it computes: family_probe), hash
routing, zero experts, router weights on the input, fused shared experts. Where an argument is
an expression of the checkpoint's config, the table says "config" and the plugin decides when
it loads the checkpoint, with the reason in its log and `smoothsmoe_layer_smoothed{layer}`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from smoothsmoe_kernels.config import BIASED_SCORING_FUNCS

# Architectures served in tests/server (tiny random checkpoints, or the embedded default model).
TESTED = {
    "Qwen3MoeForCausalLM": "default model (every server test); block FP8: tests/server/test_fp8_served.py",
    "Qwen2MoeForCausalLM": "tests/server/test_architectures.py",
    "MixtralForCausalLM": "tests/server/test_architectures.py",
    "OlmoeForCausalLM": "tests/server/test_architectures.py",
    "DeepseekV2ForCausalLM": "tests/server/test_architectures.py",
    "DeepseekV3ForCausalLM": "tests/server/test_architectures.py",
    "GraniteMoeForCausalLM": "tests/server/test_architectures.py",
    "Glm4MoeForCausalLM": "tests/server/test_architectures.py",
    "PhiMoEForCausalLM": "tests/server/test_architectures.py (stays stock)",
    "GptOssForCausalLM": "tests/server/test_architectures.py",
    "Llama4ForCausalLM": "tests/server/test_architectures.py (with this project's experts)",
    "Qwen3NextForCausalLM": "tests/server/test_architectures.py",
    "MiniMaxM2ForCausalLM": "tests/server/test_architectures.py (sigmoid + bias)",
    "Ernie4_5_MoeForCausalLM": "tests/server/test_architectures.py (stays stock)",
}
# Architectures vLLM's CPU build cannot run here, so no tiny checkpoint of them is served: why,
# and where their routing family is tested instead.
NOT_SERVABLE_ON_CPU = {
    arch: "no: vLLM's DeepSeek-V4 CPU kernels (attention, routing) are AVX512-only; "
          "family in tests/server/test_routing_families.py"
    for arch in ("DeepseekV4ForCausalLM", "DeepseekV4ForConditionalGeneration")
}
FAMILY_NAMES = {"softmax": "softmax", "sigmoid": "sigmoid", "sqrtsoftplus": "sqrt-softplus",
                "topk_sigmoid": "top-k, then sigmoid"}
# Arguments that keep a layer stock when given (not None / False), as routing_config checks them.
STOCK_IF_GIVEN = {"router": "its own router", "hash_indices_table": "hash-routed layers",
                  "zero_expert_type": "zero experts", "bias_vl": "a vision routing bias",
                  "fuse_shared_experts": "shared experts fused into routing",
                  "runner_cls": "a model-supplied MoE runner"}


@dataclass(frozen=True)
class ModelRow:
    architecture: str
    family: str  # e.g. "softmax, renormalized" or "config: <expression>"
    smoothed: str  # "yes", "no", or "config" (decided at load)
    why: str  # the reason for "no", or what decides "config"
    tested: str


def model_rows() -> list[ModelRow]:
    from vllm.model_executor.models import registry

    archs = {**registry._TEXT_GENERATION_MODELS, **registry._MULTIMODAL_MODELS}
    rows = []
    for arch, (module, _cls) in sorted(archs.items()):
        name = module if module.startswith("vllm.") else f"vllm.model_executor.models.{module}"
        calls = _factory_calls(name)
        if calls:
            rows.append(_row(arch, name, calls))
    return rows


def _source_files(module: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if origin.name == "__init__.py":  # a package (vllm.models.*): every platform's model file
        return sorted(p for p in origin.parent.rglob("*.py") if "test" not in p.name)
    return [origin]


def _factory_calls(module: str, follow: bool = True) -> list[tuple[str, dict[str, str]]]:
    """(module of the call, {keyword: source text}) of every FusedMoEFactory call in the module's
    source; if it has none, those of the vLLM model modules it imports (one level)."""
    calls, imported = [], []
    for path in _source_files(module):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node.func) in ("FusedMoEFactory", "FusedMoE"):
                calls.append((module, {kw.arg: ast.unparse(kw.value) for kw in node.keywords if kw.arg}))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    ("vllm.model_executor.models.", "vllm.models.")):
                imported.append(node.module)
    if not calls and follow:
        for other in dict.fromkeys(imported):
            calls += _factory_calls(other, follow=False)
    return calls


def _called_name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _row(arch: str, module: str, calls: list[tuple[str, dict[str, str]]]) -> ModelRow:
    families, smoothed, whys = [], [], []
    for call_module, kw in calls:
        family, ok, why = _decide(call_module, kw)
        families.append(family)
        smoothed.append(ok)
        whys.append(why)
    families, whys = list(dict.fromkeys(families)), [w for w in dict.fromkeys(whys) if w]
    verdict = smoothed[0] if len(set(smoothed)) == 1 else "config"
    if len(set(smoothed)) > 1:
        whys.append("layers differ (some smoothed, some stock)")
    return ModelRow(arch, "; ".join(families), verdict, "; ".join(whys),
                    TESTED.get(arch) or NOT_SERVABLE_ON_CPU.get(arch, ""))


def _given(kw: dict[str, str], name: str) -> bool:
    return name in kw and kw[name] not in ("None", "False", "0")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def _decide(module: str, kw: dict[str, str]) -> tuple[str, str, str]:
    """(family, 'yes'/'no'/'config', why) of one FusedMoEFactory call, as routing_config decides."""
    renorm = kw.get("renormalize", "True")
    norm = {True: ", renormalized", False: ", not renormalized"}.get(_literal(renorm), f", renormalize = {renorm}")
    if _given(kw, "router"):
        return "its own router", "no", "the model supplies its own router"
    if _given(kw, "custom_routing_function"):
        found, family, failure = _recognised(module, kw["custom_routing_function"])
        if not found:
            return (f"custom function {kw['custom_routing_function']}", "config",
                    "its routing function is probed when the model is built (not reachable from here)")
        if failure is not None:
            return (f"custom function {kw['custom_routing_function']}", "no",
                    f"its routing function could not be probed: {failure}")
        if family is None:
            return (f"custom function {kw['custom_routing_function']}", "no",
                    "its routing function computes none of the spec's families")
        family = FAMILY_NAMES[family[0]] + (", renormalized" if family[1] else ", not renormalized")
    else:
        scoring = _literal(kw.get("scoring_func", "'softmax'"))
        if scoring is None:
            return f"config: {kw['scoring_func']}", "config", "the scoring function comes from the checkpoint's config"
        if scoring not in FAMILY_NAMES or scoring == "topk_sigmoid":
            return str(scoring), "no", f"scoring_func {scoring!r} is not one of the spec's families"
        biased = _given(kw, "e_score_correction_bias")
        family = FAMILY_NAMES[scoring] + (", bias" if biased else "") + norm
        if _given(kw, "use_grouped_topk"):
            family += ", grouped" if _literal(kw["use_grouped_topk"]) is True else ", grouped if the config says"
        if biased and scoring not in BIASED_SCORING_FUNCS:
            return family, "no", f"a correction bias with {scoring} scoring is not one of the spec's families"
    if _given(kw, "apply_router_weight_on_input"):  # Llama 4: only this project's experts apply them per slot
        return family, "config", ("router weights on the input: smoothed with this project's experts (the default "
                                  "on CUDA; --smooth-experts smoothsmoe on the CPU) if the checkpoint is "
                                  "unquantized (FP8 ones quantize each token's input, not each pair's)")
    for name, what in STOCK_IF_GIVEN.items():
        if _given(kw, name):
            sure = _literal(kw[name]) is not None or name == "hash_indices_table"
            if name == "hash_indices_table":
                return family, "config", "hash-routed layers (chosen by the config) stay stock"
            return family, "no" if sure else "config", f"{what} {'' if sure else '(when the config enables it) '}" \
                f"is not supported with smoothing".replace("  ", " ")
    return family, "yes", ""


def _recognised(module: str, expression: str) -> tuple[bool, tuple[str, bool] | None, str | None]:
    """Import the model module, find the routing function the call names, and probe it:
    (whether the function was found, its family or None, why probing it failed or None)."""
    from smoothsmoe_server.engine.family_probe import RoutingFunctionFailed, recognise_routing_function

    try:
        namespace = vars(importlib.import_module(module))
    except Exception:  # noqa: BLE001: a module that does not import here: the plugin probes it at load
        return False, None, None
    fn = None
    parts = expression.split(".")
    if parts[0] == "self" and len(parts) == 2:  # self.fn: a function of one of the module's classes
        for value in list(namespace.values()):
            if isinstance(value, type) and callable(getattr(value, parts[-1], None)):
                fn = getattr(value, parts[-1])
                break
    else:
        fn = namespace.get(parts[0])
        for part in parts[1:]:
            fn = getattr(fn, part, None)
    if fn is None or not callable(fn):
        return False, None, None
    try:
        return True, recognise_routing_function(fn, 2, False, 16), None
    except RoutingFunctionFailed as e:
        return True, None, str(e)


def format_rows(rows: list[ModelRow], markdown: bool) -> str:
    header = ("architecture", "routing family", "smoothed", "why / what decides", "tested")
    cells = [header] + [(r.architecture, r.family, r.smoothed, r.why, r.tested) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells[1:]]
        return "\n".join(lines)
    widths = [min(max(len(row[i]) for row in cells), 60) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# Which checkpoints' experts this project computes (engine/layer_plan.py, quantization_reason): a property
# of the checkpoint, not of the model class, so one line for all rows.
EXPERTS_NOTE = ("Experts of smoothed layers (--smooth-experts; auto: this project's on CUDA and for block-FP8 "
                "checkpoints): this project's for unquantized and block-FP8 ones (fp8 with weight_block_size, "
                "tested in tests/server/test_fp8_served.py); other quantizations (per-tensor FP8, MXFP4, int4, ...) "
                "keep vLLM's experts, padded, and the log says why.")


def summary(rows: list[ModelRow]) -> str:
    count = {v: sum(r.smoothed == v for r in rows) for v in ("yes", "no", "config")}
    tested = sum(r.architecture in TESTED for r in rows)
    return (f"{EXPERTS_NOTE}\n{len(rows)} model classes build MoE layers: {count['yes']} smoothed, {count['no']} "
            f"stock, {count['config']} decided by the checkpoint's config; {tested} tested")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="smoothsmoe models", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="A Markdown table (as in the README).")
    args = parser.parse_args(argv)
    rows = model_rows()
    print(format_rows(rows, args.markdown))
    print(("\n" if args.markdown else "") + summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
