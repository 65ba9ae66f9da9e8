#!/usr/bin/env bash
# What the lent GPU machine lacks for slam_ray's stages, as Python 3.12 wheels in .whl/ (git-ignored), made here
# where pip reaches the package registry; bench/gpu_device.sh installs them there. That machine's image has torch,
# transformers, numpy, pandas, pyarrow, aiohttp, grpcio, requests, pyyaml, click, psutil ... but no Ray, MLflow or
# pydantic, and nothing can be fetched there; the working tree that travels is capped at 64 MiB.
#
# Ray's own wheel (~79 MB) is over that cap: it goes as a stripped copy (no Java jars, RLlib, Serve or LLM
# packages — slam_ray uses Core, Data, Train and Tune), tar + xz. Every other package is the version this
# checkout's .venv holds (what the tests here ran), downloaded with --no-deps: the list below names each one the
# stages import that the image lacks (found by importing the stages in a bare Python 3.12 with the bundle).
#
#     bash bench/gpu_bundle.sh            # -> .whl/ (~51 MB; checked in a bare Python 3.12 beside the image's packages)
#     then, with the device tool: run(command="bash bench/gpu_device.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}
PACKAGES=(
  pydantic pydantic_core annotated_types typing_inspection          # slam_ray's config
  mlflow_skinny mlflow_tracing sqlalchemy alembic mako sqlparse cryptography   # MLflow's client + sqlite store
  cachetools databricks_sdk google_auth pyasn1 pyasn1_modules     # what mlflow imports at start-up
  fastapi starlette opentelemetry_api opentelemetry_sdk opentelemetry_proto opentelemetry_semantic_conventions
  importlib_metadata python_dotenv gitpython gitdb smmap uvicorn
  jsonschema jsonschema_specifications referencing rpds_py           # Ray's runtime-env validation
  aiohttp_cors colorful opencensus opencensus_context google_api_core proto_plus googleapis_common_protos
  smart_open wrapt                                                   # Ray's dashboard (Train V2 reads its state API)
  opentelemetry_exporter_prometheus
  soundfile cffi pycparser                                           # slam_ray's audio loader
  silero_vad                                                         # pause cuts in long recordings (its ONNX model)
  pytorch_optimizer                                                  # train.optimizer choices beyond AdamW
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$1" "$2" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

rm -rf .whl && mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
    echo "gpu_bundle: $name is not installed in $VENV_PY: run 'make .venv/.installed-dev' first" >&2; exit 1; }
  download .whl "$name==$version"
done

# silero-vad's wheel carries eight model files (11 MB); slam_ray loads silero_vad.onnx alone (speech/audio.py)
python3 - .whl/silero_vad-*.whl <<'PY'
import os, sys, zipfile
wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as out:
    for item in src.infolist():
        name = item.filename
        if "/data/" not in name or name.endswith(("/silero_vad.onnx", "/__init__.py")):
            out.writestr(item, src.read(name))
os.replace(wheel + ".tmp", wheel)
PY

ray_version=$("$VENV_PY" -c "import ray; print(ray.__version__)")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download "$tmp" "ray==$ray_version"
mkdir "$tmp/site"
python3 -m zipfile -e "$tmp"/ray-*.whl "$tmp/site"
rm -rf "$tmp/site/ray/jars" "$tmp/site/ray/rllib" "$tmp/site/ray/serve" "$tmp/site/ray/llm"
find "$tmp/site" -name "__pycache__" -prune -exec rm -rf {} +
chmod +x "$tmp"/site/ray/core/src/ray/raylet/raylet "$tmp"/site/ray/core/src/ray/gcs/gcs_server 2>/dev/null || true
tar -C "$tmp/site" -cf - . | xz -9 -T2 > ".whl/ray-$ray_version-stripped.tar.xz"

du -sh .whl
total=$(du -sb .whl | cut -f1)
if (( total > 60 * 1024 * 1024 )); then
  echo "gpu_bundle: .whl is $((total / 1024 / 1024)) MiB, over what can travel beside the repository (64 MiB in all)" >&2
  exit 1
fi
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || grep -qx ".whl/" .gitignore || echo "gpu_bundle: add .whl/ to .gitignore" >&2
