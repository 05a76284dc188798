"""Finding scans: class folders (`sources`), DICOM series (`series`) and a labels file (`labels`), each
turning what is on disk into `Source`s for the build."""
