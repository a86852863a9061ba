"""Build the mcsc._C extension: the CPU kernels always, the CUDA kernels when CUDA is usable.

Environment switches:
  MCSC_FORCE_CUDA=1      compile the CUDA kernels even without a visible GPU (needs nvcc)
  MCSC_FORCE_CUDA=0      never compile them (quick CPU-only builds)
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
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                      cpp_extension.CUDA_HOME):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _build_cuda(cuda_home):
    forced = os.environ.get("MCSC_FORCE_CUDA")
    if forced == "0":
        return False, "MCSC_FORCE_CUDA=0"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA support"
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if forced == "1":
        return True, "MCSC_FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    # A CUDA build of torch plus nvcc can compile kernels without a GPU; do it by default so a
    # wheel built on a GPU-less machine still works on a GPU.
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
    with_cuda, why = _build_cuda(cuda_home)
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


main()
