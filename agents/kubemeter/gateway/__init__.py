"""``kubemeter gateway``: HTTP ingest onto the durable queue on the PersistentVolume, and delivery
from it to the billing API."""
