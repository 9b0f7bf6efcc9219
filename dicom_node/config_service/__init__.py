"""The configuration services: rules, destinations and users validated, saved and audited in one place.

Every front end - the web pages, the REST API, the CLI and the YAML import at node start -
parses its input, calls a service here and shows the result or the :class:`Refused` error,
so all of them refuse the same things with the same messages and every change is audited.
"""

from __future__ import annotations

from dicom_node.config_service.base import CLI, CONFIG_FILE, Actor, FieldError, Refused, Saved
from dicom_node.config_service.destinations import DestinationsService
from dicom_node.config_service.rules import RulesService
from dicom_node.config_service.users import UsersService

__all__ = ["CLI", "CONFIG_FILE", "Actor", "DestinationsService", "FieldError", "Refused", "RulesService", "Saved",
           "UsersService"]
