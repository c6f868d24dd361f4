"""The ground floor every other package stands on; it imports none of them.

Settings (``settings``), the exception tree (``errors``), CLI failure reporting (``console``),
background processes (``processes``), Label Studio's API and credentials (``studio``,
``studio_auth``), task image downloads (``fetch``, ``transport``) and the webhook event store
(``events``). Import from the modules, so importing the package stays cheap.
"""
