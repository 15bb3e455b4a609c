-- Argo CD health of a kubeonnx QuotaPolicy, from the operator's status.
-- Runs with Argo CD's libraries only (base, table, a safe os): no string or math.
local hs = {}
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubeonnx operator to report status"
  return hs
end
if status.observedGeneration == nil or status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubeonnx operator to observe the latest spec"
  return hs
end
for _, condition in ipairs(status.conditions) do
  if condition.type == "Ready" then
    hs.message = (condition.reason or "") .. ": " .. (condition.message or "")
    if condition.status == "True" then
      hs.status = "Healthy"
    else
      -- InvalidSpec, SecretNotFound: budgets cannot be enforced as written;
      -- ReconcileError: the latest spec could not be checked (the message says why).
      hs.status = "Degraded"
    end
    return hs
  end
end
hs.status = "Progressing"
hs.message = "Waiting for the Ready condition"
return hs
