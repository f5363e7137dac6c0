//! Compiles the C++ in `csrc/` (the c10d bridge and libtorch queries tch does not expose) against
//! the libtorch that torch-sys links, and sets an rpath to libtorch so the binaries run without
//! LD_LIBRARY_PATH. libtorch is found the way torch-sys finds it: with LIBTORCH_USE_PYTORCH set, by
//! asking the python on PATH (`scripts/env.sh` puts the project's venv first); otherwise from
//! LIBTORCH (or LIBTORCH_INCLUDE / LIBTORCH_LIB).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const PYTHON_QUERY: &str = r"
import os, torch
from torch.utils import cpp_extension
print('ABI', int(torch._C._GLIBCXX_USE_CXX11_ABI))
for p in cpp_extension.include_paths(): print('INCLUDE', p)
for p in cpp_extension.library_paths(): print('LIB', p)
print('SITE', os.path.dirname(os.path.dirname(torch.__file__)))
";

struct Torch {
    includes: Vec<PathBuf>,
    lib: PathBuf,
    cxx11_abi: String,
    /// Where CUDA and NCCL headers may be: the `nvidia/*/include` dirs of the wheels, or CUDA_HOME.
    cuda_includes: Vec<PathBuf>,
    /// Where nvcc may be: the `nvidia-cuda-nvcc` wheel's, or CUDA_HOME's.
    nvcc_candidates: Vec<PathBuf>,
}

fn env_rerun(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok()
}

fn from_python() -> Torch {
    // The same interpreter torch-sys picks.
    let python = if env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let output = Command::new(python)
        .args(["-c", PYTHON_QUERY])
        .output()
        .unwrap_or_else(|e| panic!("LIBTORCH_USE_PYTORCH is set but `{python}` did not run: {e}"));
    assert!(
        output.status.success(),
        "`{python}` could not import torch (source scripts/env.sh after scripts/setup): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut torch = Torch {
        includes: vec![],
        lib: PathBuf::new(),
        cxx11_abi: "1".into(),
        cuda_includes: vec![],
        nvcc_candidates: vec![],
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let (tag, value) = line.split_once(' ').unwrap_or((line, ""));
        match tag {
            "ABI" => torch.cxx11_abi = value.to_string(),
            "INCLUDE" => torch.includes.push(value.into()),
            "LIB" => torch.lib = value.into(),
            "SITE" => {
                // Headers of the CUDA and NCCL the wheel was built with (nvidia-cuda-runtime, -cccl,
                // -crt and nvidia-nccl wheels).
                for sub in ["nvidia/cu13/include", "nvidia/nccl/include"] {
                    let dir = Path::new(value).join(sub);
                    if dir.is_dir() {
                        torch.cuda_includes.push(dir);
                    }
                }
                torch
                    .nvcc_candidates
                    .push(Path::new(value).join("nvidia/cu13/bin/nvcc"));
            }
            _ => {}
        }
    }
    torch
}

fn from_libtorch_dir() -> Torch {
    let root = env_rerun("LIBTORCH").map(PathBuf::from);
    let include = env_rerun("LIBTORCH_INCLUDE")
        .map(PathBuf::from)
        .or_else(|| root.clone());
    let lib = env_rerun("LIBTORCH_LIB").map(PathBuf::from).or(root);
    let (Some(include), Some(lib)) = (include, lib) else {
        panic!(
            "libtorch not found: source scripts/env.sh (LIBTORCH_USE_PYTORCH=1) or set LIBTORCH"
        );
    };
    let cuda_home = env_rerun("CUDA_HOME").unwrap_or_else(|| "/usr/local/cuda".into());
    Torch {
        includes: vec![
            include.join("include"),
            include.join("include/torch/csrc/api/include"),
        ],
        lib: lib.join("lib"),
        cxx11_abi: env_rerun("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".into()),
        cuda_includes: vec![PathBuf::from(&cuda_home).join("include")],
        nvcc_candidates: vec![PathBuf::from(&cuda_home).join("bin/nvcc")],
    }
}

/// Compiles csrc/kernels.cu into a fatbin (sm_90 machine code + compute_90 PTX) and writes it as
/// a C array to OUT_DIR/charlm_kernels_fatbin.inc, which driver.cpp embeds and loads through the
/// CUDA driver API at run time (so the binary links no CUDA runtime of its own). Without nvcc the
/// array is empty and the trainer falls back to its eager kernels. Returns whether it was built.
fn build_kernels(torch: &Torch, out_dir: &Path) -> bool {
    println!("cargo:rerun-if-env-changed=CHARLM_NVCC");
    let nvcc = env::var_os("CHARLM_NVCC")
        .map(PathBuf::from)
        .or_else(|| torch.nvcc_candidates.iter().find(|p| p.is_file()).cloned());
    let fatbin = out_dir.join("charlm_kernels.fatbin");
    let built = match &nvcc {
        Some(nvcc) => {
            let status = Command::new(nvcc)
                .args(["-fatbin", "-O3", "-std=c++17"])
                .args([
                    "-gencode=arch=compute_90,code=sm_90",
                    "-gencode=arch=compute_90,code=compute_90",
                ])
                .arg("-o")
                .arg(&fatbin)
                .arg("csrc/kernels.cu")
                .status()
                .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
            assert!(status.success(), "nvcc failed on csrc/kernels.cu");
            true
        }
        None => {
            println!(
                "cargo:warning=nvcc not found (scripts/setup installs the nvidia-cuda-nvcc wheel): \
                 building without fused CUDA kernels"
            );
            false
        }
    };
    let bytes = if built {
        std::fs::read(&fatbin).expect("reading the fatbin")
    } else {
        Vec::new()
    };
    let mut text = format!(
        "static const unsigned char kCharlmFatbin[{}] __attribute__((aligned(16))) = {{",
        bytes.len().max(1)
    );
    for (i, b) in bytes.iter().enumerate() {
        if i % 32 == 0 {
            text.push('\n');
        }
        text.push_str(&format!("{b},"));
    }
    if bytes.is_empty() {
        text.push('0');
    }
    text.push_str(&format!(
        "\n}};\nstatic const size_t kCharlmFatbinSize = {};\n",
        bytes.len()
    ));
    std::fs::write(out_dir.join("charlm_kernels_fatbin.inc"), text)
        .expect("writing the fatbin include");
    built
}

fn build_kernels_placeholder(out_dir: &Path) {
    std::fs::write(
        out_dir.join("charlm_kernels_fatbin.inc"),
        "static const unsigned char kCharlmFatbin[1] = {0};\nstatic const size_t kCharlmFatbinSize = 0;\n",
    )
    .expect("writing the fatbin include");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    let torch = if env_rerun("LIBTORCH_USE_PYTORCH").is_some() {
        from_python()
    } else {
        from_libtorch_dir()
    };

    let with_cuda = torch.lib.join("libtorch_cuda.so").exists();
    let have = |header: &str| torch.cuda_includes.iter().any(|d| d.join(header).exists());
    let with_nccl = with_cuda && have("nccl.h") && have("cuda.h");
    if with_cuda && !with_nccl {
        println!(
            "cargo:warning=libtorch has CUDA but nccl.h/cuda.h were not found in {:?}: building without NCCL \
             (scripts/setup installs the header wheels)",
            torch.cuda_includes
        );
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let with_kernels = with_cuda && have("cuda.h") && build_kernels(&torch, &out_dir);
    if !with_kernels {
        // driver.cpp includes it either way; empty means "no fused kernels in this binary".
        build_kernels_placeholder(&out_dir);
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir("csrc")
        .expect("csrc/ is missing")
        .map(|e| e.expect("reading csrc/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    sources.sort();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .files(&sources)
        .includes(&torch.includes)
        .define("_GLIBCXX_USE_CXX11_ABI", torch.cxx11_abi.as_str())
        // libtorch's headers warn a lot under -Wall; our own code is small enough to read.
        .warnings(false);
    build.include(&out_dir);
    if with_cuda {
        build.includes(&torch.cuda_includes);
        if have("cuda.h") {
            build.define("CHARLM_WITH_CUDA", None);
        }
    }
    if with_nccl {
        build
            .define("USE_C10D_NCCL", None)
            .define("CHARLM_WITH_NCCL", None);
    }
    build.compile("charlm_csrc");

    // After the static library on the link line, so that --as-needed keeps them.
    println!("cargo:rustc-link-search=native={}", torch.lib.display());
    if with_cuda {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    for lib in ["torch_cpu", "torch", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    // The binaries and tests find libtorch where it was at build time; torch's own libraries find
    // CUDA, cuDNN and NCCL through their RUNPATH. Elsewhere (the GPU image) LD_LIBRARY_PATH wins.
    println!(
        "cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}",
        torch.lib.display()
    );
}
