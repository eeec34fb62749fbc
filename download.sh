#!/usr/bin/env bash
# Fetch the full public data into data/ (the layout btp/data reads; see data/README.md).
# Needs network. Safe to re-run: finished parts are skipped (marker files in data/.full/),
# files are written to a temporary name and moved into place only when complete.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./download.sh [--data-dir DIR] [--only PART]... [--force] [-h|--help]

Fetch the full data sets into DIR (default: data/ beside this script), replacing the
shipped samples of the same names.

PARTS
  zsre           MELO's data archive (Google Drive) -> zsre_train.jsonl, nq_train.json
                 Needs MELO_DATA_DRIVE_ID (the Drive file id of the archive linked from
                 MELO's README; check it there, it is not verified here) or MELO_DATA_URL
                 (a direct URL to the same archive). Drive ids need `pip install gdown`.
  scotus         HF tomh/grace-scotus -> scotus/train.csv, scotus/test.csv (text,label)
  hallucination  HF potsawee/wiki_bio_gpt3_hallucination (split evaluation)
                 -> hallucination/wikibio_gpt3_hallucination.json ({"evaluation": [...]})
  openwebtext    HF stas/openwebtext-10k (split train)
                 -> openwebtext/openwebtext-10k.jsonl (one {"text": ...} per line)

OPTIONS
  --data-dir DIR  where to write (default: data/ beside this script)
  --only PART     fetch only PART (repeatable; default: all parts)
  --force         fetch again even if a part is marked done
  -h, --help      this text

ENVIRONMENT
  PYTHON               interpreter with `datasets` (default: .venv/bin/python, else python3)
  MELO_DATA_DRIVE_ID   Google Drive file id of MELO's data archive (zsre part)
  MELO_DATA_URL        direct URL of that archive (used instead of the Drive id)
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR="$ROOT/data"
PARTS=()
FORCE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift 2 ;;
    --only) PARTS+=("${2:?--only needs a part}"); shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "download.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[[ ${#PARTS[@]} -eq 0 ]] && PARTS=(zsre scotus hallucination openwebtext)
for p in "${PARTS[@]}"; do
  case "$p" in zsre|scotus|hallucination|openwebtext) ;;
    *) echo "download.sh: unknown part '$p'" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

mkdir -p "$DATA_DIR/.full"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
FAILED=()

log() { echo "[download.sh] $*" >&2; }
done_marker() { echo "$DATA_DIR/.full/$1"; }

fetch_zsre() {
  local archive="$TMP/melo_data"
  if [[ -n "${MELO_DATA_URL:-}" ]]; then
    curl -fL --retry 3 -o "$archive" "$MELO_DATA_URL" || return 1
  elif [[ -n "${MELO_DATA_DRIVE_ID:-}" ]]; then
    if ! "$PYTHON" -c "import gdown" 2>/dev/null; then
      log "zsre: gdown is not installed; run: $PYTHON -m pip install gdown"; return 1
    fi
    "$PYTHON" -m gdown "https://drive.google.com/uc?id=${MELO_DATA_DRIVE_ID}" -O "$archive" || return 1
  else
    log "zsre: set MELO_DATA_DRIVE_ID (Drive id of MELO's data archive, from MELO's README)"
    log "      or MELO_DATA_URL; skipping zsRE/NQ"
    return 1
  fi
  mkdir -p "$TMP/melo_extract" || return 1
  # (errexit is off inside a function called from `if`, hence the explicit `|| return 1`.)
  # The archive may be a zip or a (compressed) tar; let Python tell which.
  "$PYTHON" - "$archive" "$TMP/melo_extract" <<'PY'
import sys, tarfile, zipfile
src, dst = sys.argv[1], sys.argv[2]
if zipfile.is_zipfile(src):
    zipfile.ZipFile(src).extractall(dst)
elif tarfile.is_tarfile(src):
    with tarfile.open(src) as t:
        t.extractall(dst, filter="data")
else:
    sys.exit(f"zsre: {src} is neither a zip nor a tar archive; check the id/URL")
PY
  [[ $? -eq 0 ]] || return 1
  local name found
  for name in zsre_train.jsonl nq_train.json; do
    found="$(find "$TMP/melo_extract" -type f -name "$name" | sort | head -n 1)"
    if [[ -z "$found" ]]; then log "zsre: $name not found in the archive"; return 1; fi
    cp "$found" "$DATA_DIR/$name.part" || return 1
    mv -f "$DATA_DIR/$name.part" "$DATA_DIR/$name" || return 1
    log "zsre: wrote $DATA_DIR/$name"
  done
}

fetch_hf() {
  # $1 = part; exports with `datasets`, writing *.part files then renaming them.
  "$PYTHON" - "$1" "$DATA_DIR" <<'PY'
import json, os, sys
from pathlib import Path
import datasets

part, root = sys.argv[1], Path(sys.argv[2])

def replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    print(f"[download.sh] {part}: wrote {final}", file=sys.stderr)

if part == "scotus":
    out = root / "scotus"; out.mkdir(parents=True, exist_ok=True)
    ds = datasets.load_dataset("tomh/grace-scotus")
    for split in ("train", "test"):
        tmp = out / f"{split}.csv.part"
        ds[split].select_columns(["text", "label"]).to_csv(str(tmp), index=False)
        replace(tmp, out / f"{split}.csv")
elif part == "hallucination":
    out = root / "hallucination"; out.mkdir(parents=True, exist_ok=True)
    rows = datasets.load_dataset("potsawee/wiki_bio_gpt3_hallucination", split="evaluation").to_list()
    tmp = out / "wikibio_gpt3_hallucination.json.part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"evaluation": rows}, f, indent=2, ensure_ascii=False)
    replace(tmp, out / "wikibio_gpt3_hallucination.json")
    concepts = out / "wiki_bio_concepts.txt"
    n = len(concepts.read_text(encoding="utf-8").splitlines()) if concepts.exists() else 0
    if n != len(rows):
        print(f"[download.sh] WARNING: {concepts} has {n} lines for {len(rows)} passages; "
              "the loader needs one concept per passage", file=sys.stderr)
elif part == "openwebtext":
    out = root / "openwebtext"; out.mkdir(parents=True, exist_ok=True)
    ds = datasets.load_dataset("stas/openwebtext-10k", split="train")
    tmp = out / "openwebtext-10k.jsonl.part"
    with open(tmp, "w", encoding="utf-8") as f:
        for text in ds["text"]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    replace(tmp, out / "openwebtext-10k.jsonl")
else:
    sys.exit(f"unknown part {part}")
PY
}

for part in "${PARTS[@]}"; do
  marker="$(done_marker "$part")"
  if [[ -f "$marker" && $FORCE -eq 0 ]]; then
    log "$part: already fetched ($marker); --force to fetch again"
    continue
  fi
  log "$part: fetching"
  if [[ "$part" == zsre ]]; then
    if fetch_zsre; then date -u +%FT%TZ > "$marker"; else FAILED+=("$part"); fi
  else
    if fetch_hf "$part"; then date -u +%FT%TZ > "$marker"; else FAILED+=("$part"); fi
  fi
done

if [[ ${#FAILED[@]} -gt 0 ]]; then
  log "not fetched: ${FAILED[*]} (see the messages above)"
  exit 1
fi
log "done: $DATA_DIR"
