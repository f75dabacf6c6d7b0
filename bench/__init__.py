"""kiln.bench: the measuring tools. The bench driver and its worker, the default-variant policy (select), the
loadtest client and the in-process ceiling, and the plots and tables they write."""
