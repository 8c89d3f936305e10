#include "bindings.h"

namespace pe {
void bind_gguf(pybind11::module_& m) { (void)m; }
}  // namespace pe
