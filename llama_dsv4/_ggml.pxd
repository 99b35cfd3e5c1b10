# The Cython layer over ggml, shared by the extension modules of llama_dsv4 (graph builders cimport it).
cimport ggml as g


cdef class Backends:
    cdef g.ggml_backend_t * backends
    cdef g.ggml_backend_dev_t * devs
    cdef g.ggml_backend_buffer_type_t * bufts  # the schedulers' buffer type per backend (RPC: a caching view)
    cdef g.ggml_threadpool * pool
    cdef int n
    cdef int n_rpc
    cdef list view_flags  # which bufts are our caching views (to free)
    cdef bint portable
    cdef list tensor_split
    cdef int n_threads
    cdef int pool_size
    cdef list _thread_ids
    cdef list _pool_thread_ids(self)
    cdef g.ggml_backend_dev_t primary_dev(self)
    cdef g.ggml_backend_dev_t dev_at(self, int i)


cdef class WeightMap:
    cdef g.ggml_context * ctx  # the local device's tensors (ctxs[home])
    cdef g.ggml_context ** ctxs  # one per backend that holds tensors
    cdef int n_ctxs
    cdef g.ggml_backend_buffer_t * bufs
    cdef int n_bufs
    cdef list _views
    cdef dict _index
    cdef list _names
    cdef frozenset _owned  # names of the tensors in memory allocated for them (not the mapping)
    cdef g.ggml_tensor ** _tensors
    cdef readonly bint zero_copy
    cdef readonly str device
    cdef g.ggml_tensor * get(self, str name) except NULL
    cdef _place(self, tensors, Backends backends, files, dict private, list dev_of)
    cdef _free_ctxs(self)
    cdef _read(self, g.ggml_tensor * t, int fd, size_t offset)


cdef class DeviceTensors:
    cdef g.ggml_context * ctx
    cdef g.ggml_backend_buffer_t buf
    cdef g.ggml_tensor ** _tensors
    cdef dict _index
    cdef readonly str device
    cdef g.ggml_tensor * get(self, str name) except NULL
