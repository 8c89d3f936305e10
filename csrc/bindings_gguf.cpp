#include <cstring>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "ggml_types.h"
#include "gguf.h"

namespace py = pybind11;

namespace pe {

namespace {

py::object decode(const std::string& s, const std::string& path, const std::string& key) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), Py_ssize_t(s.size()), "strict");
  if (!o) {
    PyErr_Clear();
    PE_THROW(ModelFormatError, path, ": metadata key '", key, "' holds a string that is not valid UTF-8");
  }
  return py::reinterpret_steal<py::object>(o);
}

template <typename T>
py::array numeric_array(const GGUFValue& v) {
  py::array_t<T> a(py::ssize_t(v.count));
  if (v.count) std::memcpy(a.mutable_data(), v.data, size_t(v.count) * sizeof(T));
  return std::move(a);
}

py::object to_python(const GGUFValue& v, const std::string& path, const std::string& key) {
  switch (v.type) {
    case GGUFType::UINT8: case GGUFType::UINT16: case GGUFType::UINT32: case GGUFType::UINT64:
      return py::int_(v.u);
    case GGUFType::INT8: case GGUFType::INT16: case GGUFType::INT32: case GGUFType::INT64:
      return py::int_(v.i);
    case GGUFType::FLOAT32: case GGUFType::FLOAT64: return py::float_(v.f);
    case GGUFType::BOOL: return py::bool_(v.u != 0);
    case GGUFType::STRING: return decode(v.str, path, key);
    case GGUFType::ARRAY: break;
  }
  switch (v.elem_type) {
    case GGUFType::UINT8: return numeric_array<uint8_t>(v);
    case GGUFType::INT8: return numeric_array<int8_t>(v);
    case GGUFType::UINT16: return numeric_array<uint16_t>(v);
    case GGUFType::INT16: return numeric_array<int16_t>(v);
    case GGUFType::UINT32: return numeric_array<uint32_t>(v);
    case GGUFType::INT32: return numeric_array<int32_t>(v);
    case GGUFType::UINT64: return numeric_array<uint64_t>(v);
    case GGUFType::INT64: return numeric_array<int64_t>(v);
    case GGUFType::FLOAT32: return numeric_array<float>(v);
    case GGUFType::FLOAT64: return numeric_array<double>(v);
    case GGUFType::BOOL: {
      py::array_t<bool> a(py::ssize_t(v.count));
      for (uint64_t j = 0; j < v.count; j++) a.mutable_data()[j] = v.data[j] != 0;
      return std::move(a);
    }
    case GGUFType::STRING: {
      py::list l(v.strings.size());
      for (size_t j = 0; j < v.strings.size(); j++) l[j] = decode(v.strings[j], path, key);
      return std::move(l);
    }
    default: PE_THROW(ModelFormatError, path, ": metadata key '", key, "' is an array of arrays");
  }
}

}  // namespace

void bind_gguf(py::module_& m) {
  py::class_<GGUFFile, std::shared_ptr<GGUFFile>>(m, "GGUFFile", "A GGUF file, memory-mapped and validated.")
      .def(py::init([](const std::string& path, bool use_mmap) {
             py::gil_scoped_release nogil;
             return std::make_shared<GGUFFile>(path, use_mmap);
           }),
           py::arg("path"), py::arg("use_mmap") = true)
      .def_property_readonly("path", &GGUFFile::path)
      .def_property_readonly("version", &GGUFFile::version)
      .def_property_readonly("alignment", &GGUFFile::alignment)
      .def_property_readonly("metadata",
                             [](const GGUFFile& f) {
                               // Numeric arrays are copied out of the mapping: check around the copy.
                               f.check_unchanged();
                               py::dict d;
                               for (const auto& [k, v] : f.metadata()) d[py::str(k)] = to_python(v, f.path(), k);
                               f.check_unchanged();
                               return d;
                             })
      .def(
          "get",
          [](const GGUFFile& f, const std::string& key, py::object default_value) -> py::object {
            const auto it = f.metadata().find(key);
            if (it == f.metadata().end()) return default_value;
            f.check_unchanged();
            py::object v = to_python(it->second, f.path(), key);
            f.check_unchanged();
            return v;
          },
          py::arg("key"), py::arg("default") = py::none(),
          "metadata[key] without building the whole dict (a vocabulary is ~100k Python objects), or "
          "`default` when the file has no such key.")
      .def_property_readonly("tensors",
                             [](const GGUFFile& f) {
                               py::list l;
                               for (const auto& t : f.tensors()) {
                                 py::dict d;
                                 d["name"] = t.name;
                                 d["type"] = t.type;
                                 d["type_name"] = type_name(t.type);
                                 d["shape"] = py::tuple(py::cast(t.ne));  // ggml order (ne[0] first)
                                 d["offset"] = t.offset;
                                 d["nbytes"] = t.nbytes;
                                 l.append(d);
                               }
                               return l;
                             })
      .def(
          "tensor_bytes",
          [](const GGUFFile& f, const std::string& name) {
            const GGUFTensorInfo* t = f.find_tensor(name);
            if (!t) throw py::key_error("no tensor named '" + name + "' in " + f.path());
            // A copy, not a view of the mapping: a view read after the file shrank would fault
            // outside any check (mapped_file.h).
            f.check_unchanged();
            py::array_t<uint8_t> a(py::ssize_t(t->nbytes));
            if (t->nbytes) std::memcpy(a.mutable_data(), t->data, t->nbytes);
            f.check_unchanged();
            return a;
          },
          py::arg("name"), "Raw bytes of a tensor as a uint8 numpy array (a copy).");
}

}  // namespace pe
