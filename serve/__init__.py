"""kiln.serve: the server only. A LitServe server over an artifact folder, with V2 and /predict routes.

Words, each meaning one thing:
- InferenceRequest (serve.protocol): a validated request, kiln's own type, whatever wire it came on;
- Result (serve.channel): one request's outputs and timings, what the inference call gives back;
- Job and Answer (serve.channel): the messages between the HTTP process and a worker that carry those two;
- Reply (serve.routes): an HTTP answer's status, bytes and headers; `Request` alone is Starlette's.

Seams, each one function or class that a new front end, host or policy calls or adds:
- serve.inference.InferenceService.infer / .call: the transport-neutral inference call (gRPC, Ray Serve);
- core.runner.ModelRunner: a model opened once, batches prepared and run (the LitAPI, a Ray replica, the ceiling);
- serve.admission.BatchAdmission: which requests a batch takes (RowsAdmission today; a token budget next);
- serve.workers.start_workers / ModelWorkers.retire: a model's workers started and stopped while the server runs.
"""
