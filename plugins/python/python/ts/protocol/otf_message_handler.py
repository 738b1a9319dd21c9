"""`ts.protocol.otf_message_handler`: the part handlers call, streaming."""

import cresset_runtime


def send_intermediate_predict_response(ret, req_id_map, message, code, context=None):
    """Send `ret` (one item per request of the batch, in order) as an intermediate chunk of
    each request's streamed answer. `req_id_map`, `message` and `code` are accepted as in
    TorchServe; a chunk's status is its request's final one."""
    if not isinstance(ret, (list, tuple)):
        raise TypeError("send_intermediate_predict_response expects a list, one item per request")
    for idx, item in enumerate(ret):
        cresset_runtime.send_chunk(idx, item, context)
