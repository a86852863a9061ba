"""Fail unless the installed mcsc._C carries working CUDA kernels (run by CI after install).

Checks, each with a message saying what is wrong:
1. mcsc._C was compiled with CUDA (its `with_cuda` attribute is 1);
2. mcsc::supcon_forward and mcsc::supcon_backward have kernels for the CUDA dispatch key;
3. the shared library contains sm_90 machine code (a cubin, not only PTX);
4. with a cuobjdump (CUDA_HOME, PATH, or the one triton's wheel carries), for every cubin:
   the mma.sync kernels (fp16/bf16 and float32 TF32, MCSC_CUDA_KERNELS=mma; every
   instantiation, including the backward's float32-output ones that compute the reference-set
   call's anchor gradients for fp16/bf16 features, which must be present) have no stack frame
   and no local memory (so no register spills) in --dump-resource-usage, and their SASS
   contains HMMA, LDSM and LDGSTS (tensor-core multiplies, ldmatrix and cp.async really made it
   into the machine code). The WMMA kernels' usage is printed, not checked.

No GPU is needed. The architectures are read from the headers of the CUDA fat binary in the
library's .nv_fatbin section (they are not compressed even when the payloads are), with
cuobjdump --list-elf as a cross-check; a cuobjdump (in $CUDA_HOME/bin, on PATH or in triton's
wheel) is required, since it also reads the kernels' resource usage and SASS.
Usage: python .ci/check_cuda_build.py [--arch 90 ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX = 1
KIND_CUBIN = 2


def elf_section(path: str, name: str) -> bytes:
    """Contents of the named section of a 64-bit little-endian ELF file (b'' if absent)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQ", data, section_offset + i * entry_size) for i in range(count)
    ]
    names_offset = sections[names_index][4]
    for name_offset, _, _, _, offset, size in sections:
        start = names_offset + name_offset
        if data[start : data.index(b"\0", start)].decode() == name:
            return data[offset : offset + size]
    return b""


def fatbin_entries(section: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of every entry of the fat binaries in a .nv_fatbin section.

    Layout (public reverse engineering, matching cuobjdump): a fat binary is a 16-byte header
    (magic, version, header size, payload size) followed by entries whose header starts with
    kind (u16: 1 PTX, 2 cubin), a u16, the header size (u32), the padded payload size (u64)
    and carries the SM number as a u32 at byte 28.
    """
    entries = []
    position = 0
    while position + 16 <= len(section):
        magic, _, header_size, payload_size = struct.unpack_from("<IHHQ", section, position)
        if magic != FATBIN_MAGIC:
            position += 8  # fat binaries are 8-byte aligned; skip padding between them
            continue
        entry = position + header_size
        end = entry + payload_size
        while entry < end:
            kind, _, entry_header_size, entry_size = struct.unpack_from("<HHIQ", section, entry)
            (sm,) = struct.unpack_from("<I", section, entry + 28)
            entries.append(({KIND_PTX: "ptx", KIND_CUBIN: "cubin"}.get(kind, str(kind)), sm))
            entry += entry_header_size + entry_size
        position = end
    return entries


def find_cuobjdump() -> str | None:
    """CUDA_HOME's or PATH's cuobjdump, else the one in triton's wheel (which the CUDA build of
    torch installs)."""
    candidates = [
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
        shutil.which("cuobjdump"),
    ]
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuobjdump_cubin_archs(tool: str, path: str) -> set[int]:
    listing = subprocess.run(
        [tool, "--list-elf", path], capture_output=True, text=True, check=True
    ).stdout
    # Names like supcon_cuda.sm_90.cubin or .sm_90a.cubin (arch-specific variants count as 90).
    return {int(sm) for sm in re.findall(r"\.sm_(\d+)[a-z]?\.cubin", listing)}


# Kernels that must keep everything in registers, by a fragment of their mangled names: the
# mma.sync kernels, every instantiation (fp16, bf16, float32 TF32); the forward's is the tiled
# kernel with the MmaMultiply policy (its FmaMultiply instantiation has no HMMA and is not
# checked).
MMA_KERNELS = ("supcon_forward_tiled_kernelINS0_11MmaMultiply", "supcon_backward_mma_kernel")
# The mma backward with float32 output for fp16 and bf16 features (the reference-set call's
# anchor gradients, written in the accumulation dtype), by a fragment of their mangled names.
ANCHOR_GRADIENT_KERNELS = (
    "supcon_backward_mma_kernelIN3c104HalfEf",
    "supcon_backward_mma_kernelIN3c108BFloat16Ef",
)
# Instructions every mma.sync kernel's SASS must contain: tensor-core multiply, ldmatrix, and
# cp.async (LDGSTS: global to shared without registers).
MMA_INSTRUCTIONS = ("HMMA", "LDSM", "LDGSTS")


def cuobjdump_functions(tool: str, path: str, option: str) -> dict[tuple[str, str], str]:
    """{(arch, mangled function): its text} from `cuobjdump <option>`, whose output names each
    cubin's arch ("arch = sm_90") and starts each function with "Function NAME:"
    (--dump-resource-usage) or "Function : NAME" (-sass)."""
    text = subprocess.run([tool, option, path], capture_output=True, text=True, check=True).stdout
    functions: dict[tuple[str, str], str] = {}
    arch = "?"
    current = None
    for line in text.splitlines():
        found = re.match(r"\s*arch = (sm_\w+)", line)
        if found:
            arch = found.group(1)
            current = None
            continue
        found = re.match(r"\s*Function\s*:?\s*(\S+?):?\s*$", line)
        if found:
            current = (arch, found.group(1))
            functions[current] = ""
        elif current is not None:
            functions[current] += line + "\n"
    return functions


def resource_usage(tool: str, path: str) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, mangled function, {REG, STACK, SHARED, LOCAL, ...}) for every kernel of every
    cubin, from cuobjdump --dump-resource-usage."""
    return [
        (arch, name, {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", text)})
        for (arch, name), text in cuobjdump_functions(tool, path, "--dump-resource-usage").items()
    ]


def register_kernel_failures(tool: str, path: str) -> list[str]:
    """What is wrong with the mma.sync kernels' resources and instructions."""
    failures = []
    usage = [
        (arch, name, fields)
        for arch, name, fields in resource_usage(tool, path)
        if "supcon_" in name
    ]
    if not any(any(kernel in name for kernel in MMA_KERNELS) for _, name, _ in usage):
        failures.append(
            "no mma.sync kernel (supcon_forward_tiled_kernel<MmaMultiply>, "
            "supcon_backward_mma_kernel) in the library"
        )
    for arch in sorted({arch for arch, _, _ in usage}):
        for kernel in ANCHOR_GRADIENT_KERNELS:
            if not any(kernel in name for other, name, _ in usage if other == arch):
                failures.append(f"{arch} lacks the anchor-gradient kernel {kernel}")
    for arch, name, fields in usage:
        checked = any(kernel in name for kernel in MMA_KERNELS)
        print(
            f"  {arch} REG {fields.get('REG')} STACK {fields.get('STACK')} LOCAL "
            f"{fields.get('LOCAL')} SHARED {fields.get('SHARED')} {'' if checked else '(not checked) '}"
            f"{name}"
        )
        if checked and (fields.get("STACK", 0) or fields.get("LOCAL", 0)):
            failures.append(
                f"{arch} {name} has a stack frame or local memory (spills): "
                f"STACK {fields.get('STACK')}, LOCAL {fields.get('LOCAL')}"
            )
    for (arch, name), sass in cuobjdump_functions(tool, path, "-sass").items():
        if not any(kernel in name for kernel in MMA_KERNELS):
            continue
        missing = [op for op in MMA_INSTRUCTIONS if not re.search(rf"\b{op}\b", sass)]
        if missing:
            failures.append(f"{arch} {name} lacks {', '.join(missing)} in its SASS")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, action="append", help="SM numbers that need a cubin (default: 90)"
    )
    required = set(parser.parse_args().arch or [90])
    failures = []

    try:
        from mcsc import _C
    except ImportError as error:
        print(f"FAIL: cannot import mcsc._C ({error}); is mcsc installed?")
        return 1
    import torch

    if getattr(_C, "with_cuda", 0) != 1:
        failures.append(
            "mcsc._C was compiled without CUDA (mcsc._C.with_cuda != 1); build with "
            "a CUDA torch and nvcc, or MCSC_FORCE_CUDA=1"
        )
    for op in ("mcsc::supcon_forward", "mcsc::supcon_backward"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
            failures.append(f"{op} has no kernel for the CUDA dispatch key")

    library = _C.__file__
    entries = fatbin_entries(elf_section(library, ".nv_fatbin"))
    cubins = {sm for kind, sm in entries if kind == "cubin"}
    ptx = {sm for kind, sm in entries if kind == "ptx"}
    print(f"{library}: cubin sm {sorted(cubins)}, ptx compute {sorted(ptx)}")
    missing = required - cubins
    if missing:
        failures.append(
            f"{library} lacks machine code for sm {sorted(missing)} "
            f"(TORCH_CUDA_ARCH_LIST must include them)"
        )
    tool = find_cuobjdump()
    if tool is None:
        failures.append(
            "no cuobjdump found (CUDA_HOME/bin, PATH or triton's wheel): the "
            "kernels' registers and instructions cannot be checked"
        )
    else:
        cross_check = cuobjdump_cubin_archs(tool, library)
        if cross_check != cubins:
            failures.append(
                f"cuobjdump lists cubins for sm {sorted(cross_check)} but the "
                f"fatbin headers say {sorted(cubins)}"
            )
        print("kernel resources (cuobjdump --dump-resource-usage):")
        failures += register_kernel_failures(tool, library)

    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print(
            "OK: mcsc._C has CUDA kernels registered and sm "
            f"{', '.join(str(sm) for sm in sorted(required))} machine code"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
