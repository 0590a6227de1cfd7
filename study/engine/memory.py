"""A trial's GPU memory: its allocator cap, what it may upload, the per-trial CUDA switches, and out-of-memory.

Every decision here is a pure function of numbers the trial measures (card size, share, model bytes), so the
tests give them their inputs on CPU; `cap_memory`, `configure_cuda` and `free_cuda` are what touches a GPU.
"""

import gc
from typing import NamedTuple

import torch

# Each process's CUDA context (driver state, cuBLAS/cuDNN handles and kernels) lives outside the caching allocator,
# so set_per_process_memory_fraction does not count it: about 0.5 GiB per process on recent drivers, more once
# cuDNN and cuBLAS have loaded their kernels. Packed trials leave this much of their share free.
CUDA_CONTEXT_BYTES = 768 * 2**20

# Memory a training step needs besides the model: autograd's saved activations (measured per image by
# `activation_bytes_per_image`) and their gradients in the backward pass: 2x the saved bytes.
ACTIVATION_FACTOR = 2.0
WORKSPACE_BYTES = 1 * 2**30  # cuDNN/cuBLAS workspaces, taken through the allocator (cudnn.benchmark may pick big ones)
# fp32 state tensors per trainable parameter (momentum; Adam's two moments)
OPTIMIZER_SLOTS = {"sgd": 1, "nesterov": 1, "adam": 2, "adamw": 2}


class GpuShareTooSmall(ValueError):
    """The trial's GPU share is smaller than one CUDA context: no batch size can train in it."""


def allocator_fraction(share: float, total_bytes: int, context_bytes: int = CUDA_CONTEXT_BYTES) -> float | None:
    """The fraction of the card this trial's allocator may take: its share less one CUDA context, so that packed
    trials' caps plus their contexts stay within the card. None for a whole card or more (nothing to cap)."""
    if share >= 1:
        return None
    room = share * total_bytes - context_bytes
    if room <= 0:
        raise GpuShareTooSmall(f"a GPU share of {share:g} is {share * total_bytes / 2**30:.2f} GiB of this card, "
                               f"less than one CUDA context ({context_bytes / 2**30:.2f} GiB): give each trial a "
                               f"larger --gpus-per-trial")
    return room / total_bytes


def cap_memory(device: torch.device, share: float) -> int | None:
    """Cap this process's CUDA allocator at its share of the card less one CUDA context (packed trials); returns
    the bytes the trial may allocate (None on CPU)."""
    if device.type != "cuda":
        return None
    # The allocator's calls take a device index, not the bare "cuda" (a ValueError there).
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = allocator_fraction(share, total)
    if fraction is None:
        torch.cuda.set_per_process_memory_fraction(1.0, device)  # a reused worker's last trial may have set a cap
        return torch.cuda.mem_get_info(device)[0]
    # An allocation past the cap fails in this trial instead of starving its neighbours.
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return int(total * fraction)


class PerImage(NamedTuple):
    """Activation bytes per input image (measured by `activation_bytes_per_image`)."""
    saved: int  # kept by autograd for the backward pass
    train_peak: int  # the most a training forward holds at once: saved so far plus one layer's input and output
    eval_peak: int  # the same in an evaluation forward (no_grad, eval mode: nothing saved)


def activation_bytes_per_image(model: torch.nn.Module, example: torch.Tensor, autocast_dtype=None) -> PerImage:
    """What a training and an evaluation forward of `model` hold per input image: measured on forwards of `example`
    (two or more images) and of its first half, so what does not grow with the batch (weights, their autocast
    copies) drops out. The peaks count the tensors each leaf module reads and writes on top of what autograd has
    saved so far, so a frozen block's temporaries (saved by nothing) count too. Autocast casts and in-place ops are
    accounted for as they run; cuDNN's autotuning is off meanwhile (these shapes are thrown away)."""
    def measure(x, train):
        saved, peak = {}, [0]  # storage address -> bytes: a tensor saved twice (or a view of another) counts once

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        def at_layer(module, inputs, output):
            live = dict(saved)
            for t in (*inputs, *(output if isinstance(output, (tuple, list)) else (output,))):
                if isinstance(t, torch.Tensor):
                    live[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            peak[0] = max(peak[0], sum(live.values()))

        hooks = [m.register_forward_hook(at_layer) for m in model.modules() if not any(m.children())]
        was_training = model.training
        if not train:
            model.eval()
        # fork_rng: the measurement's dropout draws must not shift the trial's random stream.
        try:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(train), \
                    torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(x)
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        return sum(saved.values()), peak[0]

    if len(example) < 2:
        raise ValueError("activation_bytes_per_image needs an example of two or more images")
    half = len(example) // 2
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        (saved, train_peak), (saved_half, train_peak_half) = measure(example, True), measure(example[:half].clone(),
                                                                                             True)
        eval_peak, eval_peak_half = measure(example, False)[1], measure(example[:half].clone(), False)[1]
    finally:
        torch.backends.cudnn.benchmark = benchmark
    grown = lambda full, part: max(0, full - part) // (len(example) - half)  # noqa: E731
    return PerImage(grown(saved, saved_half), grown(train_peak, train_peak_half), grown(eval_peak, eval_peak_half))


def training_bytes(model: torch.nn.Module, optimizer: str, batch_size: int, per_image: PerImage,
                   eval_batch_size: int = 0) -> int:
    """What the model, its gradients, the optimizer's state, the largest batch's activations (a training step at
    batch_size or an evaluation at eval_batch_size, whichever holds more) and the kernels' workspaces take (bytes)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32 grads and state
    casts = params // 2  # autocast's bf16 copies of the weights, made every forward
    step = max(ACTIVATION_FACTOR * per_image.saved, per_image.train_peak) * batch_size
    activations = int(max(step, per_image.eval_peak * eval_batch_size))
    return params + casts + trained * (1 + OPTIMIZER_SLOTS[optimizer]) + activations + WORKSPACE_BYTES


def plan_uploads(split_bytes: dict, *, budget_bytes: int | None, needs_bytes: int, packed: bool) -> dict:
    """Which splits go onto the device whole, in the order given (train first), against the trial's budget.

    budget_bytes: what this trial's allocator may hold (its capped share of the card), None on CPU.
    packed: the trial shares its GPU with other trials. Each would upload its own copy of the same split (a CUDA
    tensor cannot be shared between Ray's worker processes without IPC plumbing), so packed trials read batches
    from the node's page cache through pinned memory instead: one copy in host RAM serves them all.
    """
    if budget_bytes is None or packed:
        return {name: False for name in split_bytes}
    left = budget_bytes - needs_bytes
    plan = {}
    for name, nbytes in split_bytes.items():
        plan[name] = nbytes <= left
        if plan[name]:
            left -= nbytes
    return plan


def configure_cuda(device: torch.device, *, tf32: bool, benchmark: bool) -> None:
    """Per-trial CUDA switches (a reused Ray worker keeps the last trial's, so every trial sets both).
    tf32: TF32 tensor cores for fp32 matmuls and convolutions (Ampere and later; 10-bit mantissa inputs).
    benchmark: cuDNN times its algorithms once per input shape and keeps the fastest (worth it where shapes are
    fixed)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark


def free_cuda() -> None:
    """Give a finished or failed trial's GPU memory back: collect the tensors its frames held (cycles too), then
    release the allocator's cached blocks so the next trial in this (reused) worker and the trial's neighbours get
    them. Call it after the exception has been dropped: a live traceback keeps every tensor of the failed frames."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
