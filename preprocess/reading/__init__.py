"""Reading scans: one reader per format (`nifti`, `dicom`) ending in one canonical form (`canonical`),
the registry that picks a reader (`formats`), and the transform every scan goes through (`resize`,
`scan_stats`, `transform`)."""
