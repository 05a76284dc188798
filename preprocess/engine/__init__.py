"""The build engine: options, the incremental plan (`build`), each scan in a worker (`scans`, `time_limits`,
`workers`), many scans in parallel (`parallel`: local processes or threads; `dask_cluster`: a Dask cluster),
and the splits."""
