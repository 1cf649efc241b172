"""The scenario: one YAML file describing a federation, validated into typed dataclasses (a leaf:
it imports only ``medformer``).

``schema``     the dataclasses (Scenario, its sections, Site) and the registries they check against
``build``      the engine: typed dataclasses from plain data, every problem with its field path
``overrides``  ``--set dotted.key=value``
``loader``     load_scenario (YAML + --set), scenario_from_dict, check_data_files
``errors``     ScenarioError: one line, every problem

Example:
    >>> s = load_scenario("simulations/configs/quickstart.yaml", ["training.rounds=2"])
    >>> [c.name for c in s.clients()]
    ['breast', 'pneumonia', 'retina']
"""

from config.build import from_plain
from config.errors import ScenarioError
from config.loader import check_data_files, load_scenario, scenario_from_dict
from config.overrides import apply_overrides
from config.schema import (BATCH_COUPLED_TASKS, FAULT_KINDS, PRETEXT_TASKS, ClientDPSpec, EvaluationSpec, FaultSpec,
                           HospitalSpec, ModelSpec, PartitionSpec, PrivacySpec, Scenario, SimulationSpec, Site,
                           StrategySpec, dataset_label)
from medformer.train import TrainingSpec

__all__ = [
    "BATCH_COUPLED_TASKS", "FAULT_KINDS", "PRETEXT_TASKS", "ClientDPSpec", "EvaluationSpec", "FaultSpec", "HospitalSpec",
    "ModelSpec", "PartitionSpec", "PrivacySpec", "Scenario", "ScenarioError", "SimulationSpec", "Site",
    "StrategySpec", "TrainingSpec", "apply_overrides", "check_data_files", "from_plain", "load_scenario",
    "dataset_label", "scenario_from_dict",
]
