"""The Radiomics Segmentation API's schemas: ``.proto`` files written from the protocol's facts, and the
``*_pb2.py`` modules protoc generated from them (``make proto``; a test checks they match)."""
