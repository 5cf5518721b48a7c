"""The files of a tune experiment that both the experiment (pipeline/tune/experiment.py) and its report
(pipeline/outputs/report.py) name."""

SPEC_FILE = "tokenforge_tune.yaml"  # spec + resolved base config, kept in the experiment dir for --resume
SEARCHED_FILE = (
    "searched.json"  # in each trial's directory: the values it searched (as it last started; PBT mutates them)
)
