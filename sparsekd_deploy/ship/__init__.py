"""Ship bundles to edge devices over SSH: upload, verify there, steps there, atomic activation, rollback."""
