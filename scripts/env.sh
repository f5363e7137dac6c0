# Sourced by every entry point: where the caches live and how the build finds libtorch.
# Caches sit outside the checkout so a fresh clone on the same machine reuses them.
export CHARLM_CACHE="${CHARLM_CACHE:-$HOME/.cache/charlm}"
export CHARLM_VENV="$CHARLM_CACHE/torch-venv"
export LIBTORCH_USE_PYTORCH=1
export PATH="$CHARLM_VENV/bin:$PATH"
# torch-sys asks this python for libtorch's paths; the trainer's build.rs sets an rpath to them.
