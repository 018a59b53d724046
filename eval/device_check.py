"""Is the requested device target usable by this MindSpore build, before anything runs on it?

Asking MindSpore for a backend its wheel lacks (`--device_target GPU` on the CPU-only build) ends in a
C++ stack trace at the first kernel. `mindspore.hal.is_available` answers the same question in
microseconds (measured: CPU True, GPU False, Ascend False on this machine's MindSpore 2.10 wheel).
"""

TARGETS = ("CPU", "GPU", "Ascend")


def check_device_target(target: str) -> None:
    """Raise ValueError naming the target, what this build supports and the fix, if `target` is unusable."""
    if target not in TARGETS:
        raise ValueError(f"device_target must be one of {', '.join(TARGETS)}, got {target!r}")
    from mindspore import hal  # imported here: scripts check arguments before MindSpore's 2-10 s import

    if hal.is_available(target):
        return
    usable = [name for name in TARGETS if hal.is_available(name)]
    raise ValueError(f"device_target {target} is not available with this MindSpore build on this machine (usable: "
                     f"{', '.join(usable) or 'none'}): pick one of those, or install the MindSpore wheel and "
                     f"drivers for {target}")
