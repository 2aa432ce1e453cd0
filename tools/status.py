"""engine_status: what the engine is running on and what it holds."""

from __future__ import annotations

import platform
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.defaults import embedded_status

from .base import ToolContext, ToolOutput, ToolSpec


class EngineStatusInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadedModel(BaseModel):
    key: str
    family: str
    bytes: int
    source: str


class EngineStatusOutput(BaseModel):
    device: str
    dtype: str
    kernel_backend: str = Field(description="triton or torch: the Triton kernels' side on this device")
    backends: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="per operation (topk, deltae, kv_quant, cpu_kernels, qmatmul, catalog_scan_float32, "
                    "catalog_scan_float16, llm_decode_step): {impl, why}, decided once when the engine started")
    torch_version: str
    python: str
    loaded_models: list[LoadedModel]
    models_bytes: int
    memory_budget_bytes: int | None
    device_total_bytes: int | None
    device_allocated_bytes: int | None
    queue_depth: int
    queue_capacity: int
    worker_busy: bool
    running: str | None
    embedded_defaults: dict[str, dict[str, Any]]
    configured_models: dict[str, Any]
    torchvision: str = Field(description="native, shim (pure-torch nms) or missing; \"not imported yet\" until a "
                             "tool first loads a model library (transformers, diffusers, ultralytics)")
    services: dict[str, Any] = Field(default_factory=dict,
                                     description="live engine services (text batcher: active/waiting sequences, "
                                                 "cache pools; catalogues)")
    diffusion: dict[str, Any] = Field(default_factory=dict,
                                      description="the configured diffusion pipeline (or how to configure one)")
    outputs: dict[str, Any] = Field(default_factory=dict,
                                    description="the output folder: files and bytes this server wrote, retention "
                                                "limits, files deleted by the retention")


def _services(eng: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, svc in eng.services().items():
        stats = getattr(svc, "stats", None)
        if callable(stats):
            try:
                out[name] = stats()
            except Exception as exc:  # a status call must not fail on one service
                out[name] = {"error": str(exc)}
        else:
            out[name] = {"type": type(svc).__name__}
    return out


def _diffusion_status(eng: Any, path: str) -> dict[str, Any]:
    try:
        from engine import diffusion
    except Exception as exc:  # pragma: no cover - diffusers broken
        return {"configured": bool(path), "error": f"diffusion engine unavailable: {exc}"}
    return diffusion.status(eng, path)


def _run(args: EngineStatusInput, ctx: ToolContext) -> ToolOutput:
    import torch

    eng = ctx.engine
    mem = eng.memory()
    loaded = [LoadedModel(key=e.key, family=e.family, bytes=e.nbytes, source=e.source) for e in eng.registry.loaded()]
    models = ctx.settings.models
    configured = {"llm": models.llm or "(embedded SmolLM2-135M-Instruct)",
                  "llm_weights": models.llm_weights,  # issue 13: the weight format (loaded_models: source, bytes)
                  "llm_activations": models.llm_activations,  # issue 13: q8 / fp32 products on packed weights
                  "llm_backend": "local" if getattr(models, "llm_backend", "local") == "local" else  # issue 15.3 (H1)
                  f"openai {models.llm_base_url} (model {models.llm_remote_model})",  # issue 15.3 (H1); key never shown
                  "embedding": models.embedding or "(embedded all-MiniLM-L6-v2)",
                  "diffusion": models.diffusion or "(none configured: set models.diffusion to a diffusers folder)",
                  "detectors": dict(models.detectors),
                  "catalog": models.catalog or "(bundled demo catalogue)"}
    out = EngineStatusOutput(
        device=str(eng.device), dtype=str(eng.dtype).removeprefix("torch."), kernel_backend=eng.kernel_backend,
        backends=eng.backends.report(),
        torch_version=torch.__version__, python=platform.python_version(), loaded_models=loaded,
        models_bytes=mem["models_bytes"] or 0, memory_budget_bytes=mem["budget_bytes"],
        device_total_bytes=mem["device_total_bytes"], device_allocated_bytes=mem["device_allocated_bytes"],
        queue_depth=eng.scheduler.depth, queue_capacity=eng.scheduler.max_queue, worker_busy=eng.scheduler.busy,
        running=eng.scheduler.running_label, embedded_defaults=embedded_status(), configured_models=configured,
        torchvision=eng.torchvision_state,
        diffusion=_diffusion_status(eng, models.diffusion),
        services=_services(eng),
        outputs=ctx.output_usage() if hasattr(ctx, "output_usage") else {},
    )
    avail = [k for k, v in out.embedded_defaults.items() if v["available"]]
    b = out.backends
    text = (f"device {out.device} ({out.dtype}), kernels: {out.kernel_backend}"
            + (f" (cpu {b['cpu_kernels']['impl']}, catalogue scan {b['catalog_scan_float32']['impl']}, "
               f"decode step {b['llm_decode_step']['impl']})" if b else "") + "; "
            f"{len(loaded)} model(s) loaded, {out.models_bytes / 1e6:.1f} MB of "
            f"{(out.memory_budget_bytes or 0) / 1e6:.0f} MB budget; queue {out.queue_depth}/{out.queue_capacity}; "
            f"embedded defaults available: {', '.join(avail) or 'none'}"
            + (f"; outputs {out.outputs['files']} file(s), {out.outputs['bytes'] / 1e6:.1f} MB"
               if out.outputs else ""))
    return ToolOutput(text=text, structured=out)


TOOLS = [
    ToolSpec(
        name="engine_status",
        title="Engine status",
        description="Report the engine's device, dtype, kernel backend (triton|torch) and the implementation of "
                    "each operation (backends), loaded models and their "
                    "bytes, memory used against the budget, queue depth, and which embedded default models are "
                    "installed. Cheap; call it to diagnose slowness or missing models.",
        input_model=EngineStatusInput,
        output_model=EngineStatusOutput,
        run=_run,
        execution="inline",
        priority=0,
    )
]
