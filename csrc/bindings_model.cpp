#include "bindings.h"

namespace pe {
void bind_model(pybind11::module_& m) { (void)m; }
}  // namespace pe
