"""Label Studio ML backend: pre-labels from Triton, webhook events for the trainer.

Public surface, by module (imported from there, so importing the package stays cheap):
``app.create_app``, ``events.EventStore`` / ``StoredEvent``, ``prelabel.prelabel_project``,
``controls.plan_for_config``, ``geometry.pixels_to_percent`` / ``percent_to_pixels``.
"""
