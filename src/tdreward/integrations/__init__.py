"""Bridges to other training libraries (imported on demand: `tdreward.integrations.trl`)."""
