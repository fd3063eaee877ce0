"""The Radiomics Segmentation API (Varian Velocity's door, Microsoft InnerEye's protocol): routes on the
gateway's app, message conversion, model catalogue from the registry, feedback and telemetry records.

A front door like the HTTP gateway and the job API: it turns protobuf messages into a volume for
``Pipeline.run_volume`` (through a job) and the result back into protobuf; it calls no handler itself.
"""
