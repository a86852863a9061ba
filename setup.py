"""Build the mcsc._C extension: the CPU kernels always, the CUDA kernels when CUDA is usable.

Environment switches:
  (default)              compile the CUDA kernels when torch is a CUDA build and nvcc is found
                         (no GPU needed)
  MCSC_FORCE_CUDA=1      compile them or fail, naming what is missing (nvcc, a CUDA torch)
  MCSC_FORCE_CUDA=0      never compile them (quick CPU-only builds)
  CUDA_HOME / CUDA_PATH  the CUDA toolkit (default /usr/local/cuda, then torch's guess)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0+PTX": A100, H100, PTX for newer)
  MCSC_CPU_ARCH=...      -march for the CPU kernels (default: the best of x86-64-v4 / v3 that
                         this machine runs; "none" for a generic build)
  DEBUG=1                -O0 -g, no NDEBUG
Build against the torch that will run the package: `pip install --no-build-isolation .`
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The CUDA toolkit to build with: CUDA_HOME (or CUDA_PATH) when set, else the usual places."""
    chosen = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [chosen] if chosen else ["/usr/local/cuda", cpp_extension.CUDA_HOME]
    for candidate in candidates:
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


# The CUDA kernels read PyTorch's TF32 switch through at::Float32Backend, new in torch 2.10.
OLDEST_TORCH_FOR_CUDA = (2, 10)


def _torch_release(version):
    """(major, minor) of a torch version string such as "2.14.1+cu130"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def cuda_decision(forced, torch_cuda_version, cuda_home, torch_version=None):
    """Whether to compile the CUDA kernels, and why: (build, reason).

    forced is MCSC_FORCE_CUDA ("1", "0" or None), torch_cuda_version is torch.version.cuda
    (None for a CPU-only torch), cuda_home the toolkit found (None without nvcc) and
    torch_version torch.__version__ (default: the running one).
    MCSC_FORCE_CUDA=1 either builds the kernels or stops the install naming what is missing.
    """
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"MCSC_FORCE_CUDA must be 1 or 0, not {forced!r}")
    if forced == "0":
        return False, "MCSC_FORCE_CUDA=0"
    torch_version = torch_version or torch.__version__
    missing = []
    if _torch_release(torch_version) < OLDEST_TORCH_FOR_CUDA:
        missing.append("torch >= {}.{} (found {})".format(*OLDEST_TORCH_FOR_CUDA, torch_version))
    if torch_cuda_version is None:
        missing.append(f"a CUDA build of torch (torch {torch_version} is CPU-only)")
    if cuda_home is None:
        missing.append("nvcc (set CUDA_HOME to the CUDA toolkit that matches torch's CUDA "
                       f"{torch_cuda_version})" if torch_cuda_version else "nvcc")
    if forced == "1":
        if missing:
            raise SystemExit("MCSC_FORCE_CUDA=1 but the CUDA kernels cannot be built: missing "
                             + " and ".join(missing))
        return True, "MCSC_FORCE_CUDA=1"
    if missing:
        return False, "no " + " and no ".join(missing)
    # A CUDA build of torch plus nvcc compiles kernels without a GPU; do it by default so a
    # library built on a GPU-less machine still works on a GPU.
    return True, "CUDA torch and nvcc present"


def _cpu_arch():
    """The x86-64 level of the build machine: the CPU kernels' exp loops need AVX2/AVX-512."""
    chosen = os.environ.get("MCSC_CPU_ARCH")
    if chosen:
        return None if chosen == "none" else chosen
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo
                          if line.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "x86-64-v4"
    if {"avx2", "fma", "bmi2"} <= set(flags):
        return "x86-64-v3"
    return None


def _cuda_library_headers():
    """Headers torch includes that a bare toolkit may lack; pip's nvidia packages ship them."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def main():
    debug = os.environ.get("DEBUG") == "1"
    cuda_home = _find_cuda_home()
    with_cuda, why = cuda_decision(os.environ.get("MCSC_FORCE_CUDA"), torch.version.cuda,
                                   cuda_home)
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    torch_version = f"-DMCSC_TORCH_VERSION={torch.__version__}"
    cpu_arch = _cpu_arch()
    cxx_flags = opt + ["-fopenmp", torch_version] + ([f"-march={cpu_arch}"] if cpu_arch else [])
    nvcc_flags = opt + ["-lineinfo", "--expt-relaxed-constexpr", torch_version,
                        "-DMCSC_WITH_CUDA"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _cuda_library_headers()
        cxx_flags.append("-DMCSC_WITH_CUDA")
        extension_class = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        extension_class = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}

    print("mcsc build configuration:", file=sys.stderr)
    print(f"  torch        {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
    print(f"  CUDA kernels {'yes' if with_cuda else 'no'} ({why})", file=sys.stderr)
    if with_cuda:
        print(f"  CUDA_HOME    {cuda_home}", file=sys.stderr)
        print(f"  arch list    {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    print(f"  CPU arch     {cpu_arch or 'generic'}", file=sys.stderr)
    print(f"  debug        {debug}", file=sys.stderr)
    print(f"  sources      {' '.join(sources)}", file=sys.stderr)

    setup(
        ext_modules=[
            extension_class(
                "mcsc._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args=extra,
                extra_link_args=["-fopenmp"],
            )
        ],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
