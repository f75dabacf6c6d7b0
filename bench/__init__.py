"""kiln.bench: the measuring tools. The bench driver and its worker, the choice of a default variant recorded in
the manifest (select; the policy itself is kiln.core.selection), the loadtest client and the in-process ceiling,
and the plots and tables they write."""
