"""Review before release on the gateway: the reviewer's routes and page, corrections checked and reported,
and decisions kept as feedback per model version (the held results themselves: ``inference.jobs.reviews``)."""
