# The two entry points from the README.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	. $(VENV)/bin/activate && dvc repro

test: install
	$(PY) -m pytest -q

# Real photos: `make photos ROOT=/datasets/VOCdevkit/VOC2012` writes params.yaml from the photos
# preset (VOC layout; edit data.dataset for coco / folder) and runs the graph.
photos: install
	@test -n "$(ROOT)" || { echo "make photos: set ROOT to a VOC-style dataset folder, e.g. make photos ROOT=/datasets/VOC2012"; exit 2; }
	@test -d "$(ROOT)" || { echo "make photos: ROOT=$(ROOT) is not a folder"; exit 2; }
	$(VENV)/bin/wsss params --preset photos --set data.root=$(abspath $(ROOT)) > params.yaml.tmp
	mv params.yaml.tmp params.yaml
	. $(VENV)/bin/activate && dvc repro

.PHONY: install demo test photos
